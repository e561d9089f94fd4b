"""Model registry: log and register the final model, describe the version, aliases, promotion."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dicomops.errors import RegistryUnavailableError
from dicomops.tracking import model_card
from dicomops.tracking.promotion import (
    Decision,
    ModelScore,
    PoolComparison,
    ReaderAgreement,
    decide_promotion,
)
from dicomops.tracking.runs import configure_mlflow

CHALLENGER, CHAMPION = "challenger", "champion"
RECORDED_CHAMPION = "dicomops.champion"  # registered-model tag: the champion dicomops last recorded
WEIGHTS_ARTIFACT = "weights"
DECISION_TAG = "promotion.decision"  # a version's decided state (gate, reviewer, superseded): never finished again
ModelBuilder = Callable[[dict[str, Any]], Any]
log = logging.getLogger(__name__)


class PoolUnscoredError(Exception):
    """The champion could not be scored on the challenger's pool (:func:`apply_promotion_gate`)."""


def register_model(tracking_uri: str, run_id: str, model: Any, example: np.ndarray, name: str,
                   card: Callable[[str], str], tags: dict[str, str], metadata: dict[str, str] | None = None,
                   output: Callable[[Any], Any] | None = None) -> str:
    """Log `model` to `run_id` with a signature and input example, register it, describe it with
    ``card(version)`` (:mod:`dicomops.tracking.model_card`), alias it challenger.

    Once per run: a training run registers one version, so the run id names it. When an earlier
    attempt (a retry of the task, or a re-run after a crash) already made a version of `name` from
    `run_id`, that version is finished instead (card, tags, the challenger alias) and no second one
    is made; one a gate or a reviewer has decided since (:data:`DECISION_TAG`) is returned as it is.

    `output` turns the model's logits into what the signature declares (default: class
    probabilities, a softmax over dimension 1; the segmenter passes a sigmoid)."""
    client = configure_mlflow(tracking_uri)
    made = sorted(client.search_model_versions(f"name='{name}' and run_id='{run_id}'"), key=lambda v: int(v.version))
    if made and DECISION_TAG in (made[0].tags or {}):
        return str(made[0].version)
    version = str(made[0].version) if made else _log_version(tracking_uri, run_id, model, example, name, metadata,
                                                            output)
    client.update_model_version(name, version, description=card(version))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    previous = alias_version(client, name, CHALLENGER)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if previous is not None and str(previous.version) != version:  # its card must not still ask for review
        client.set_model_version_tag(name, str(previous.version), DECISION_TAG, "superseded")
        _rewrite_section(client, name, str(previous.version), model_card.decision_section(
            "superseded", (f"version {version} is the challenger now",), str(previous.version), model_name=name))
    return version


def _log_version(tracking_uri: str, run_id: str, model: Any, example: np.ndarray, name: str,
                 metadata: dict[str, str] | None, output: Callable[[Any], Any] | None) -> str:
    """Log `model` to `run_id` and register it as a new version of `name`; return that version."""
    import mlflow.pytorch
    import monai
    import torch
    from mlflow.models import infer_signature

    import mlflow

    configure_mlflow(tracking_uri)
    with torch.no_grad():
        logits = model(torch.from_numpy(example))
        result = (output(logits) if output is not None else torch.softmax(logits, dim=1)).numpy()
    signature = infer_signature(example, result)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example, registered_model_name=name, metadata=metadata,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"])
    return str(info.registered_model_version)


def _score(figures: Mapping[str, float], metric: str = "auc") -> ModelScore:
    """The version's cross-validated score from its figures (:func:`version_figures`)
    ``cv.mean_<metric>`` and ``cv.<metric>.<vendor>``."""
    prefix = f"cv.{metric}."
    vendors = {k.removeprefix(prefix): v for k, v in figures.items() if k.startswith(prefix)}
    return ModelScore(figures.get(f"cv.mean_{metric}", float("nan")), vendors)


FIGURE_PREFIX = "cv."
SHOWN_TOLERANCE = 5e-5 + 1e-12  # a figure's tag is rounded to four decimals


def version_figures(client: Any, mv: Any) -> dict[str, float]:
    """The version's cross-validated figures (its ``cv.*`` tags) to full precision: what the gate
    compares. A tag is rounded to four decimals for the version page, so two figures 0.0049 apart
    could read 0.0050 apart; each is read from the metric of the same name on the version's run,
    which its training logged unrounded. The tag stands where the run has no such metric, or one
    its tag was not rounded from (a version registered before the segmenter logged its figures).

    Raises:
        RegistryUnavailableError: the version's run could not be read (not: it is gone).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    shown: dict[str, float] = {}
    for key, text in (mv.tags or {}).items():
        if key.startswith(FIGURE_PREFIX):
            try:
                shown[key] = float(text)
            except ValueError:
                continue
    metrics: dict[str, float] = {}
    if shown and mv.run_id:
        try:
            metrics = dict(client.get_run(str(mv.run_id)).data.metrics)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise RegistryUnavailableError(f"could not read the run of version {mv.version} of {mv.name}: "
                                               f"{err}") from err
        except Exception as err:  # a server that does not answer
            raise RegistryUnavailableError(f"could not read the run of version {mv.version} of {mv.name}: "
                                           f"{type(err).__name__}: {err}") from err

    def full(key: str, value: float) -> float:
        logged = metrics.get(key)
        if logged is None:
            return value
        logged = float(logged)
        same = (math.isnan(logged) and math.isnan(value)) or abs(logged - value) <= SHOWN_TOLERANCE
        return logged if same else value

    return {key: full(key, value) for key, value in shown.items()}


def model_version(client: Any, name: str, version: str) -> Any:
    """Version `version` of the registered model `name`.

    Raises:
        ValueError: there is no such version (or model), naming the versions there are.
        RegistryUnavailableError: the registry did not answer.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
        ErrorCode,
    )

    missing = (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE))
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code not in missing:
            raise RegistryUnavailableError(f"could not read version {version} of {name}: {err}") from err
    try:
        there = sorted((str(mv.version) for mv in client.search_model_versions(f"name='{name}'")), key=int)
    except Exception:
        there = []
    raise ValueError(f"{name} has no version {version!r}" + (f"; its versions are {', '.join(there)}" if there
                                                             else "; train one first (dicomops train)"))


def registered_from(tracking_uri: str, name: str, version: str, run_id: str) -> bool:
    """Whether the store at `tracking_uri` holds version `version` of `name`, registered from run
    `run_id`: what a stage's completion record may be trusted with before it is skipped (a work
    directory trained against one store and run against a fresh one skipped training, "version 1
    stands", with no model there). A registry that does not answer raises."""
    try:
        return str(model_version(configure_mlflow(tracking_uri), name, version).run_id) == str(run_id)
    except ValueError:  # no such version in this store
        return False


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version of `name` holding `alias`, or None when no version holds it (or the model is not
    registered yet). Any other failure, such as a server that does not answer or a locked
    database, raises :class:`RegistryUnavailableError`: an outage must never read as "no version".

    The alias is looked up in the registered model's alias table rather than by catching the
    error of ``get_model_version_by_alias``, whose "not found" is an INVALID_PARAMETER_VALUE that
    cannot be told from other bad requests without parsing its message.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    def unavailable(err: Exception) -> RegistryUnavailableError:
        cause = str(err) if isinstance(err, MlflowException) else f"{type(err).__name__}: {err}"
        return RegistryUnavailableError(f"could not read which version of {name} holds '{alias}': {cause}")

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise unavailable(err) from err
    except Exception as err:
        raise unavailable(err) from err
    version = (model.aliases or {}).get(alias)
    if version is None:
        return None
    try:
        return client.get_model_version(name, str(version))
    except Exception as err:
        raise unavailable(err) from err


def apply_promotion_gate(tracking_uri: str, name: str, version: str, *, margin: float,
                         vendor_tolerance: float, min_auc: float, metric: str = "auc",
                         readers: Callable[[str], ReaderAgreement | None] | None = None,
                         min_reader_series: int = 10, floors: Mapping[str, tuple[str, float]] | None = None,
                         pool: Callable[[str], PoolComparison] | None = None) -> Decision:
    """Compare the challenger with the champion; promote automatically or leave it for review.

    `readers(champion_version)` compares the two on the series readers labelled (None: no such series).
    `floors` ``{name: (tag, floor)}``: figures of the challenger, read from its tags, that must
    reach their floor (:func:`~dicomops.tracking.promotion.decide_promotion`).
    `pool(champion_version)` scores both on the challenger's pool
    (:func:`dicomops.training.champion_pool.champion_on_pool`); without it, or where the champion
    keeps nothing to be scored by there (``PoolComparison.unavailable``), its own CV figures are
    compared and a reason says so; a failure to score it there is a gate error, as below.

    When the champion cannot be read, the gate does not decide: the version stays challenger and
    its tags say why (``promotion.decision = gate-error``), for a reviewer or a re-run to settle.
    """
    client = configure_mlflow(tracking_uri)
    challenger = client.get_model_version(name, version)
    try:
        sync_reviews(tracking_uri, name)  # a champion chosen on the MLflow page counts as chosen
        held = alias_version(client, name, CHALLENGER)
        if held is None or str(held.version) != str(version):  # decided already: a re-run changes nothing
            return _left_as_it_is(client, name, version)
        current = alias_version(client, name, CHAMPION)
        # Compared to full precision: the tags' four decimals are for people to read.
        ours = version_figures(client, challenger)
        theirs = version_figures(client, current) if current is not None and str(current.version) != str(version) \
            else None
        on_pool = _on_pool(pool, str(current.version)) if pool is not None and theirs is not None \
            and current is not None else None
    except (RegistryUnavailableError, PoolUnscoredError) as err:
        decision = Decision(False, (f"gate not applied: {err}; the version stays challenger (re-run the "
                                    f"gate or decide with '{model_card.review_command('promote', name, version)}')",), error=True)
    else:
        champion = _score(theirs, metric) if theirs is not None else None
        agreement = readers(str(current.version)) if readers is not None and champion is not None \
            and current is not None else None
        figures = {name: (ours.get(tag, float("nan")), floor) for name, (tag, floor) in (floors or {}).items()}
        decision = decide_promotion(_score(ours, metric), champion, margin=margin,
                                    vendor_tolerance=vendor_tolerance, min_auc=min_auc, metric=metric.upper(),
                                    readers=agreement, min_reader_series=min_reader_series, floors=figures,
                                    pool=on_pool)
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version, key, value)
    _rewrite_section(client, name, version, model_card.decision_section(decision.label, decision.reasons, version,
                                                                                model_name=name))
    if decision.promote:
        _make_champion(client, name, version)
    return decision


def _on_pool(pool: Callable[[str], PoolComparison], champion_version: str) -> PoolComparison:
    """`pool(champion_version)`. A failure to score the champion there is not a reason to compare
    its own pool's figures (a retrain's gate would promote on the comparison it exists to replace):
    it is a gate error, the version stays challenger, and the log has the details (the tags name the
    error's type only)."""
    try:
        return pool(champion_version)
    except Exception as err:
        log.warning("the champion v%s could not be scored on the challenger's pool: %s: %s", champion_version,
                    type(err).__name__, err)
        raise PoolUnscoredError(f"the champion v{champion_version} could not be scored on this version's pool "
                                f"({type(err).__name__}; the log says more)") from err


def _left_as_it_is(client: Any, name: str, version: str) -> Decision:
    """What the gate says of a version that is no longer the challenger: its recorded decision, and
    whether that made it the champion (tags in step with the aliases: :func:`sync_reviews` ran)."""
    tags = model_version(client, name, version).tags or {}  # an outage: RegistryUnavailableError, a gate error
    replaced = "promotion.replaced_by" in tags  # a champion once: its decision tag still says how it became one
    recorded = "replaced" if replaced else str(tags.get(DECISION_TAG) or "undecided")
    return Decision(recorded in DECIDED,
                    (f"version {version} is not the challenger ({recorded}); the gate leaves it as it is",),
                    recorded=recorded)


def _rewrite_section(client: Any, name: str, version: str, text: str) -> None:
    """Replace one section of the version's card (the heading of `text` names which)."""
    key = next(iter(model_card.split_sections(text)))
    current = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=model_card.set_section(current, key, text))


def _make_champion(client: Any, name: str, version: str) -> None:
    """Give `version` the champion alias; it stops being the challenger, and the version it
    replaces says so on its card. One meaning per alias: a version never holds both."""
    previous = alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, RECORDED_CHAMPION, version)  # how a move made by hand is seen
    current = client.get_model_version(name, version)
    for stale in ("promotion.replaced_by", "review.decision", "review.reason", "review.reviewer"):
        if stale in (current.tags or {}):  # an older verdict on this version no longer holds
            client.delete_model_version_tag(name, version, stale)
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)
    if previous is not None and str(previous.version) != str(version):
        client.set_model_version_tag(name, str(previous.version), "promotion.replaced_by", str(version))
        _rewrite_section(client, name, str(previous.version),
                         model_card.decision_section("replaced", (f"version {version} became champion",),
                                                     str(previous.version), model_name=name))


def describe_export(tracking_uri: str, name: str, version: str, metrics: dict[str, float], tensorrt: str,
                    artifacts: str) -> None:
    """Write the export's figures into the version's card."""
    client = configure_mlflow(tracking_uri)
    _rewrite_section(client, name, version, model_card.export_section(metrics, tensorrt, artifacts))


def describe_comparison(tracking_uri: str, name: str, version: str, body: str) -> None:
    """The comparison with other versions (:mod:`dicomops.tracking.compare`) on the version's page."""
    client = configure_mlflow(tracking_uri)
    _rewrite_section(client, name, version, model_card.section(model_card.COMPARISON, body))


def parse_ref(ref: str, default_model: str) -> tuple[str, str]:
    """The registered model and version `ref` names: ``V``, version V of `default_model`, or
    ``MODEL/V``, version V of MODEL (say the segmenter's, ``dicomops-ct-nodule-seg/2``)."""
    name, _, version = ref.rpartition("/")
    if not version.isdigit():
        raise ValueError(f"{ref!r} names no version: give V or MODEL/V, as in 3 or dicomops-ct-nodule-seg/2")
    return name or default_model, version


def describe_feedback(tracking_uri: str, name: str, version: str, rows: list[dict[str, Any]], window_days: float,
                      run_id: str) -> None:
    """Agreement with readers on the version's page: tags (``feedback.kappa`` ...) and a card section."""
    client = configure_mlflow(tracking_uri)
    overall = next((r for r in rows if r["vendor"] == "all"), None)
    if overall is not None:
        for key in ("kappa", "disagreement", "dice"):
            if key in overall and (key != "dice" or float(overall[key]) == float(overall[key])):  # no Dice: no tag
                client.set_model_version_tag(name, version, f"feedback.{key}", f"{float(overall[key]):.2f}")
    _rewrite_section(client, name, version, model_card.feedback_section(rows, window_days, run_id))


def promote(tracking_uri: str, name: str, version: str, reviewer: str = "reviewer", note: str | None = None) -> None:
    """A person's decision: make `version` the champion, and record who decided (tags and card)."""
    client = configure_mlflow(tracking_uri)
    current = client.get_model_version(name, version)  # raises with MLflow's message if it does not exist
    gate = [r for r in (current.tags or {}).get("promotion.reasons", "").split("; ") if r]
    # The tags first: a sync between the two must not take the alias for a move made on the page.
    client.set_model_version_tag(name, version, "promotion.decision", "promoted-by-reviewer")
    client.set_model_version_tag(name, version, "promotion.reviewer", reviewer)
    _make_champion(client, name, version)
    _rewrite_section(client, name, version,
                     model_card.decision_section("promoted-by-reviewer", gate, version, reviewer, note,
                                                 model_name=name))


def reject(tracking_uri: str, name: str, version: str, reviewer: str, reason: str) -> None:
    """A person's decision against `version`: it loses the challenger alias and says why. The
    champion cannot be rejected this way; promote another version first."""
    if not reason.strip():
        raise ValueError("a rejection needs a reason (--reason TEXT): it is what the next reviewer reads")
    client = configure_mlflow(tracking_uri)
    current = client.get_model_version(name, version)
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version):
        raise ValueError(f"version {version} is the champion of {name}; promote another version first, "
                         f"then reject this one")
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)
    for key, value in {"promotion.decision": "rejected-by-reviewer", "promotion.reviewer": reviewer,
                       "review.decision": "rejected", "review.reason": reason}.items():
        client.set_model_version_tag(name, version, key, value)
    gate = [r for r in (current.tags or {}).get("promotion.reasons", "").split("; ") if r]
    _rewrite_section(client, name, version,
                     model_card.decision_section("rejected-by-reviewer", gate, version, reviewer, reason,
                                                 model_name=name))


DECIDED = ("auto-promoted", "promoted-by-reviewer")
UI_REVIEWER = "a reviewer in the MLflow UI"


def sync_reviews(tracking_uri: str, name: str) -> list[str]:
    """Bring decisions a reviewer made on the MLflow page alone into the tags and cards: a
    ``champion`` alias moved by hand is an approval (and the version it replaced says so); a
    ``review.decision = rejected`` tag is a rejection (with ``review.reason``). The alias rule is
    restored either way: the champion does not also hold ``challenger``, a rejected version holds
    neither. Returns one line per change, for the log. Flows that read the champion call this first.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = configure_mlflow(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return []
        raise RegistryUnavailableError(f"could not read which version of {name} holds '{CHAMPION}': {err}") from err
    except Exception as err:  # a server that does not answer
        raise RegistryUnavailableError(f"could not read which version of {name} holds '{CHAMPION}': "
                                       f"{type(err).__name__}: {err}") from err
    aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name='{name}'")}
    changes = []
    champion = aliases.get(CHAMPION)
    recorded = (model.tags or {}).get(RECORDED_CHAMPION)
    if champion is not None and champion != recorded:
        for other, mv in versions.items():  # the champions it replaced, still saying they serve
            if other != champion and mv.tags.get("promotion.decision") in DECIDED \
                    and "promotion.replaced_by" not in mv.tags:
                client.set_model_version_tag(name, other, "promotion.replaced_by", champion)
                _rewrite_section(client, name, other, model_card.decision_section(
                    "replaced", (f"version {champion} became champion",), other, model_name=name))
        gate = [r for r in versions[champion].tags.get("promotion.reasons", "").split("; ") if r]
        client.set_registered_model_tag(name, RECORDED_CHAMPION, champion)
        for stale in ("promotion.replaced_by", "review.decision", "review.reason", "review.reviewer"):
            if stale in versions[champion].tags:
                client.delete_model_version_tag(name, champion, stale)
        client.set_model_version_tag(name, champion, "promotion.decision", "promoted-by-reviewer")
        client.set_model_version_tag(name, champion, "promotion.reviewer", UI_REVIEWER)
        _rewrite_section(client, name, champion,
                         model_card.decision_section("promoted-by-reviewer", gate, champion, UI_REVIEWER,
                                                 model_name=name))
        changes.append(f"version {champion} was made champion in the MLflow UI: recorded as approved")
    if champion is not None and aliases.get(CHALLENGER) == champion:
        client.delete_registered_model_alias(name, CHALLENGER)
        changes.append(f"version {champion} is champion: it no longer holds challenger")
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name='{name}'")}
    for version, mv in versions.items():
        if mv.tags.get("review.decision") == "rejected" and mv.tags.get("promotion.decision") != "rejected-by-reviewer":
            if version == champion:
                changes.append(f"version {version} is tagged rejected but is the champion: left as it is; "
                               "promote another version first")
                continue
            reject(tracking_uri, name, version, mv.tags.get("review.reviewer", UI_REVIEWER),
                   mv.tags.get("review.reason") or "rejected in the MLflow UI (no review.reason given)")
            changes.append(f"version {version} was tagged rejected in the MLflow UI: recorded, challenger removed")
    return changes


def load_weights(tracking_uri: str, run_id: str, build: ModelBuilder) -> tuple[Any, dict[str, Any]]:
    """The model of training run `run_id` as an eval-mode ``torch.nn.Module``, with the raw config it
    was logged with: `build` turns that config (the ``weights/`` artifact's ``train_config.json``)
    into an untrained network, whose weights then come from ``weights/model.pt``.

    The registry does not know how networks are built; training passes its builder
    (:func:`dicomops.training.model.model_from_config`).
    """
    import json
    import tempfile

    import torch

    client = configure_mlflow(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, WEIGHTS_ARTIFACT, tmp))
        raw = json.loads((folder / "train_config.json").read_text())
        model = build(dict(raw))
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), raw

"""The two pages people act on, in a real headless Chromium: the MLflow model-version page a
reviewer reads to approve a version (the gate's decision and the per-vendor table must be there,
rendered), and the Prefect UI with prefect.yaml's deployments, where the retrain automation must
name the event that starts it.

Screenshots land in ``$DICOMOPS_UI_ARTIFACTS/ui-screenshots`` (``make integration`` sets it under
``work/``; CI keeps the folder), or in a pytest tmp folder. The README's pictures in ``docs/img/``
are copies of them, refreshed by hand.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from .conftest import Service

pytestmark = pytest.mark.integration
MODEL = "ui-model"
EVENT = "dicomops.drift.detected"  # what the monitor emits and the retrain deployment waits for
WAIT_S = 60  # a cold SPA on a busy 2-core machine renders in a few seconds; this bounds a broken one
VIEWPORT = {"width": 1440, "height": 1000}
# MLflow scrolls its page inside a panel, which a full-page screenshot does not extend: a tall
# window keeps the card and the version's tags in one picture.
MLFLOW_VIEWPORT = {"width": 1440, "height": 1700}


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    description: str  # as stored on the version, after the gate rewrote its section
    decision: str  # the promotion.decision tag
    run_name: str  # of the run the version was logged from
    vendors: tuple[str, ...]  # whose figures the card was written from


@contextlib.contextmanager
def _client_env(service: Service) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in service.env.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def model_version(mlflow_server: Service) -> Version:
    """A version registered and gated by the project's own code, as training registers one
    (:func:`dicomops.training.cv.register`), with a tiny network and made-up but consistent
    cross-validation figures. The one function to adapt when the registry's API changes."""
    import torch

    from dicomops.feedback import privacy
    from dicomops.tracking import model_card, registry
    from dicomops.tracking.runs import configure_mlflow, start_run

    vendors = {"ge": 0.93, "siemens": 0.91, "philips": 0.89, "canon": 0.90}
    summary = {"mean_auc": 0.9075, "std_auc": 0.015, "threshold": 0.42, "vendor_auc": vendors}
    evidence = [{"vendor": v, "n": 30, "positives": 12, "auc_pooled": auc, "auc_ci_low": auc - 0.05,
                 "auc_ci_high": min(auc + 0.04, 1.0), "auc_fold_mean": auc, "auc_fold_std": 0.02, "sensitivity": 0.83,
                 "specificity": 0.89, "tp": 10, "fp": 2, "fn": 2, "tn": 16} for v, auc in vendors.items()]
    per_fold = [{"fold": f, "n": 30, "positives": 12, "auc": 0.90 + f / 100, "sensitivity": 0.8, "specificity": 0.9}
                for f in range(4)]
    identity = {"split_sha256": "0" * 64}
    pool = privacy.PoolCounts(privacy.Release(  # as the privacy module releases the pool's counts
        name=privacy.POOL_RELEASE, dataset="ds", by=privacy.POOL_BY, epsilon=1.0, delta=6e-7, scale=1.0, threshold=11,
        table=pd.DataFrame({"vendor": [v for v in vendors for _ in (0, 1)], "label": ["0", "1"] * len(vendors),
                            "count": [18, 12] * len(vendors)})), "", "rows")
    tags = {"cv.mean_auc": f"{summary['mean_auc']:.4f}", **{f"cv.auc.{v}": f"{a:.4f}" for v, a in vendors.items()}}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 2)).eval()
    example = np.zeros((2, 2, 8, 8), dtype=np.float32)
    uri = mlflow_server.url
    run_name = "train"
    with _client_env(mlflow_server):
        run_id = start_run(uri, "ui", None, run_name=run_name, tags={})
        version = registry.register_model(
            uri, run_id, model, example, MODEL,
            lambda v: model_card.initial_card(MODEL, v, summary, evidence, per_fold, identity, pool), tags)
        decision = registry.apply_promotion_gate(uri, MODEL, version, margin=0.005, vendor_tolerance=0.02,
                                                 min_auc=0.8)
        stored = configure_mlflow(uri).get_model_version(MODEL, version)
    assert stored.tags["promotion.decision"] == decision.label
    return Version(MODEL, version, stored.description or "", decision.label, run_name, tuple(vendors))


def _plain(markdown: str) -> str:
    """What a Markdown line reads as once rendered: no heading marks, emphasis or code ticks."""
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", re.sub(r"[*`]", "", markdown.lstrip("#")))  # not snake_case
    return text.strip()


def _first_heading(markdown: str) -> str:
    heading = next((line for line in markdown.splitlines() if line.startswith("#")), None)
    assert heading, f"the version's description has no heading:\n{markdown[:1000]}"
    return _plain(heading)


def _vendor_table(markdown: str) -> tuple[list[str], list[str]]:
    """The header cells and first-column cells of the Markdown table whose header starts '| vendor |'
    (the cells' padding, no-break spaces, left out)."""
    lines = markdown.replace("&nbsp;", "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| vendor |")), None)
    assert start is not None, f"no per-vendor table ('| vendor |') in the description:\n{markdown[:1500]}"
    header = [_plain(c) for c in lines[start].strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(_plain(line.strip().strip("|").split("|")[0]))
    assert rows, f"the per-vendor table has no rows:\n{markdown[:1500]}"
    return header, rows


def _screenshot(page: Any, path: Path) -> None:
    """The page once its requests have settled, with transitions run to their end (a page
    fading in would otherwise be caught half-drawn)."""
    with contextlib.suppress(Exception):  # a page that polls never goes idle; the content is there already
        page.wait_for_load_state("networkidle", timeout=5_000)
    page.screenshot(path=str(path), full_page=True, animations="disabled")


def _fail(page: Any, shots: Path, name: str, what: str) -> None:
    """Keep what the browser showed, then fail saying what was missing and where to look."""
    picture, text = shots / f"{name}-failed.png", shots / f"{name}-failed.txt"
    with contextlib.suppress(Exception):
        page.screenshot(path=str(picture), full_page=True, animations="disabled")
    visible = ""
    with contextlib.suppress(Exception):
        visible = page.inner_text("body", timeout=5_000)
    text.write_text(f"{page.url}\n\n{visible}")
    pytest.fail(f"{name}: {what} within {WAIT_S} s at {page.url}; screenshot {picture}, visible text {text}:\n"
                f"{visible[:1500]}", pytrace=False)


def _wait_visible(page: Any, shots: Path, name: str, locator: Any, what: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.first.wait_for(state="visible", timeout=WAIT_S * 1000)
    except PlaywrightTimeout:
        _fail(page, shots, name, f"{what} was not visible")


def _in_sight(page: Any, shots: Path, name: str, locator: Any, what: str) -> None:
    from playwright.sync_api import expect

    try:
        expect(locator).to_be_in_viewport(timeout=10_000)
    except AssertionError:
        _fail(page, shots, name, f"{what} was not in sight")


def _wait_for_texts(page: Any, shots: Path, name: str, texts: list[str], exact: bool = False) -> None:
    for text in texts:
        _wait_visible(page, shots, name, page.get_by_text(text, exact=exact), f"text {text!r}")


def _close_assistant_panel(page: Any) -> None:
    """MLflow 3 opens its chat side panel on every page; it covers part of the screenshot."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    with contextlib.suppress(Exception):  # cosmetic: a UI without the panel is fine
        close.click(timeout=3_000)
        close.wait_for(state="hidden", timeout=3_000)


def _cell(scope: Any, tag: str, text: str) -> Any:
    return scope.locator(tag).filter(has_text=re.compile(rf"^\s*{re.escape(text)}\s*$"))


def test_mlflow_version_page_shows_the_decision_and_the_vendor_table(model_version: Version, mlflow_server: Service,
                                                                     chromium: Any, ui_screenshots: Path) -> None:
    heading = _first_heading(model_version.description)
    header, vendors = _vendor_table(model_version.description)
    assert "Decision" in heading and set(model_version.vendors) <= set(vendors), model_version.description
    context = chromium.new_context(viewport=MLFLOW_VIEWPORT, http_credentials={
        "username": mlflow_server.env["MLFLOW_TRACKING_USERNAME"],
        "password": mlflow_server.env["MLFLOW_TRACKING_PASSWORD"]})
    try:
        page = context.new_page()
        name = "mlflow-model-version"
        page.goto(f"{mlflow_server.url}/#/models/{model_version.name}/versions/{model_version.version}")
        # The rendered card: its first heading, and a real table whose header has a 'vendor' cell.
        _wait_for_texts(page, ui_screenshots, name, [heading])
        table = page.locator("table").filter(has=_cell(page, "th", header[0]))
        _wait_visible(page, ui_screenshots, name, table, "a rendered table with a 'vendor' header")
        for cell in header[1:]:
            _wait_visible(page, ui_screenshots, name, _cell(table, "th", cell), f"the table header {cell!r}")
        for vendor in vendors:
            _wait_visible(page, ui_screenshots, name, _cell(table, "td", vendor), f"the vendor row {vendor!r}")
        # The gate's decision as a tag of the version: its row, scrolled into sight (the tag table
        # scrolls inside the page, so an element there can exist without being seen).
        row = page.locator("tr").filter(has=_cell(page, "td", "promotion.decision")).filter(
            has=_cell(page, "td", model_version.decision))
        _wait_visible(page, ui_screenshots, name, row, f"the tag promotion.decision = {model_version.decision!r}")
        row.first.scroll_into_view_if_needed()
        _in_sight(page, ui_screenshots, name, row.first, "the promotion.decision tag")
        # The version links the training run it came from (the link fills in after the page).
        _wait_visible(page, ui_screenshots, name, page.get_by_role("link", name=model_version.run_name, exact=True),
                      f"the link to the source run {model_version.run_name!r}")
        _close_assistant_panel(page)
        _screenshot(page, ui_screenshots / f"{name}.png")
    finally:
        context.close()


def test_prefect_ui_shows_the_deployments_and_the_retrain_trigger_event(prefect_deployments: Service, chromium: Any,
                                                                        ui_screenshots: Path) -> None:
    ui = prefect_deployments.url.removesuffix("/api")
    context = chromium.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        # Auth is on: sign in through the UI's own form, as a person would.
        page.goto(f"{ui}/deployments")
        password = page.get_by_placeholder("admin:pass")
        _wait_visible(page, ui_screenshots, "prefect-login", password, "the login form")
        password.fill(prefect_deployments.env["PREFECT_API_AUTH_STRING"])
        page.get_by_role("button", name="Login").click()

        page.goto(f"{ui}/deployments")
        _wait_for_texts(page, ui_screenshots, "prefect-deployments", ["pipeline", "monitor", "retrain"], exact=True)
        _screenshot(page, ui_screenshots / "prefect-deployments.png")

        page.goto(f"{ui}/automations")
        _wait_for_texts(page, ui_screenshots, "prefect-automations", [EVENT, "Run deployment"])
        _screenshot(page, ui_screenshots / "prefect-automations.png")

        # The list names the automation but shows its trigger only as "A custom trigger": the
        # trigger's own form says which event it waits for, and from which resources.
        page.get_by_role("link").filter(has_text=EVENT).first.click()
        page.wait_for_url(re.compile(r"/automations/automation/[0-9a-f-]+$"), timeout=WAIT_S * 1000)
        page.goto(f"{page.url}/edit")
        name = "prefect-automation-trigger"
        _wait_for_texts(page, ui_screenshots, name, ["Any event matching", "From the following resources"])
        _wait_visible(page, ui_screenshots, name, page.get_by_text(EVENT, exact=True), f"the event {EVENT!r} as a trigger")
        _wait_visible(page, ui_screenshots, name, page.get_by_text("dicomops.model.*", exact=True),
                      "the trigger's resource 'dicomops.model.*'")
        _screenshot(page, ui_screenshots / f"{name}.png")
    finally:
        context.close()

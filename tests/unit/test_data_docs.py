"""Data Docs a reviewer reads in an air-gapped hospital: nothing fetched from the network, every
asset present, the tables drawn, and a status that is the gate's verdict (warnings are warnings)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from dicomops.validation import default_expectations, validate_table
from dicomops.validation.docs import ASSETS_DIR, CDN_ASSETS, make_docs_offline, offline_problems
from tests.unit.test_validation import _table

GX_TEMPLATES = Path(pytest.importorskip("great_expectations").__file__).parent / "render/view/templates"
# What a browser fetches by itself: scripts, stylesheets and icons, images, url() in styles.
LOADED = re.compile(r"<script\b[^>]*\bsrc=\"([^\"]+)\"|<link\b[^>]*\bhref=\"([^\"]+)\"|<img\b[^>]*\bsrc=\"([^\"]+)\""
                    r"|url\(\s*'?([^')]+)'?\s*\)")


def _duplicate_uid(table: pd.DataFrame) -> pd.DataFrame:
    table.loc[len(table) - 1, "SOPInstanceUID"] = table.loc[0, "SOPInstanceUID"]  # a warning only
    return table


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bool, Path]]:
    """Two runs: one where only a warning fails, one where a critical expectation fails too."""
    root = tmp_path_factory.mktemp("docs")
    warning = _duplicate_uid(_table(4))
    critical = _duplicate_uid(_table(4))
    critical.loc[1, "PatientID"] = None
    built = {}
    for name, table in (("warning", warning), ("critical", critical)):
        outcome = validate_table(table, default_expectations(), root / name)
        assert outcome.docs_index == (root / name / "index.html").resolve()
        built[name] = (outcome.success, root / name)
    return built


def _status(site: Path) -> tuple[str, str]:
    """The validation page's status line: its words and its icon's classes."""
    (page,) = (site / "validations").rglob("*.html")
    match = re.search(r"Status:</span>\s*<i class=\"([^\"]+)\"[^>]*></i>\s*([^<\n]+)", page.read_text())
    assert match, f"no status line in {page}"
    return match.group(2).strip(), match.group(1)


def _index_status(site: Path) -> list[str]:
    return re.findall(r"'_validation_success_text': '(\w+)'", (site / "index.html").read_text())


def test_a_run_where_only_a_warning_fails_succeeds_with_warnings(sites: dict[str, tuple[bool, Path]]) -> None:
    success, site = sites["warning"]
    assert success
    words, icon = _status(site)
    assert words == "Succeeded with 1 warning" and "text-warning" in icon
    assert _index_status(site) == ["Success"]


def test_a_run_where_a_critical_expectation_fails_is_failed(sites: dict[str, tuple[bool, Path]]) -> None:
    success, site = sites["critical"]
    assert not success
    words, icon = _status(site)
    assert words == "Failed" and "text-danger" in icon
    assert _index_status(site) == ["Failed"]


def test_the_built_site_loads_nothing_from_the_network(sites: dict[str, tuple[bool, Path]]) -> None:
    for _, site in sites.values():
        pages = list(site.rglob("*.html"))
        assert len(pages) == 3  # index, suite, validation
        for page in pages:
            refs = [next(g for g in m if g) for m in LOADED.findall(page.read_text())]
            assert len(refs) >= 14, f"{page.name}: the scripts and styles were dropped, not bundled"
            remote = [r for r in refs if re.match(r"(https?:)?//", r)]
            assert not remote, f"{page.relative_to(site)} loads {remote}"
            local = [r for r in refs if not r.startswith("data:")]
            missing = [r for r in local if not (page.parent / r.split("?")[0]).is_file()]
            assert not missing, f"{page.relative_to(site)} names missing files {missing}"
            assert any(r.endswith("static/vendor/jquery-3.7.1/jquery.min.js") for r in local)
            assert not re.search(r"\b(integrity|crossorigin)=", page.read_text())  # blocked on file://
        assert offline_problems(site) == []
        assert "jQuery v3.7.1" in (site / "static/vendor/jquery-3.7.1/jquery.min.js").read_text()[:200]
        assert (site / "static/vendor/fontawesome-free-6.6.0/webfonts/fa-solid-900.woff2").stat().st_size > 100_000


def test_offline_problems_finds_remote_loads_and_missing_files(tmp_path: Path) -> None:
    page = tmp_path / "validations" / "s" / "page.html"
    page.parent.mkdir(parents=True)
    page.write_text('<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>'
                    '<link rel="shortcut icon" href="../static/images/favicon.ico"/>'
                    "<style>.a { background: url('https://example.org/logo.png') }</style>"
                    '<img src="//example.org/x.png"><a href="https://greatexpectations.io">GX</a>')
    problems = offline_problems(tmp_path)
    assert len(problems) == 4, problems  # the anchor is a link a reader may follow, not a load
    assert any("bootstrap.min.css from the network" in p for p in problems)
    assert any("favicon.ico, which does not exist" in p for p in problems)
    assert sum("example.org" in p for p in problems) == 2


def test_make_docs_offline_points_cdn_tags_and_misplaced_static_paths_at_local_files(tmp_path: Path) -> None:
    page = tmp_path / "validations" / "s" / "page.html"
    page.parent.mkdir(parents=True)
    (tmp_path / "static" / "images").mkdir(parents=True)
    (tmp_path / "static" / "images" / "favicon.ico").write_bytes(b"ico")
    page.write_text(  # as GX writes them: SRI attributes, and a favicon one folder too shallow
        '<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" '
        'integrity="sha384-x" crossorigin="anonymous"></script>'
        '<link rel="shortcut icon" href="../static/images/favicon.ico" type="image/x-icon"/>'
        '<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>')
    assert len(offline_problems(tmp_path)) == 3
    assert make_docs_offline(tmp_path) == [page.resolve()]
    assert page.read_text() == ('<script src="../../static/vendor/bootstrap-4.3.1/js/bootstrap.min.js"></script>'
                                '<link rel="shortcut icon" href="../../static/images/favicon.ico" type="image/x-icon"/>')
    assert offline_problems(tmp_path) == []


def test_an_unknown_cdn_url_fails_the_build_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<script src="https://cdn.jsdelivr.net/npm/newlib@1"></script>')
    with pytest.raises(ValueError, match=r"newlib@1 from the network.*CDN_ASSETS"):
        make_docs_offline(tmp_path)


def test_every_cdn_asset_of_the_gx_templates_is_bundled() -> None:
    """A GX upgrade that names new URLs fails here first, not at a hospital."""
    named = set()
    for template in GX_TEMPLATES.glob("*.j2"):
        text = template.read_text()
        named |= set(re.findall(r"<script\b[^>]*\bsrc=\"(https?://[^\"]+)\"", text))
        named |= {m for m in re.findall(r"<link\b[^>]*\bhref=\"(https?://[^\"]+)\"", text)}
    assert named and named <= set(CDN_ASSETS), sorted(named - set(CDN_ASSETS))
    for files in CDN_ASSETS.values():
        for name in files:
            assert (ASSETS_DIR / name).is_file(), name


def test_the_bundled_files_are_those_the_gx_templates_pin() -> None:
    """popper and bootstrap carry Subresource Integrity hashes in GX's templates: ours match them."""
    text = (GX_TEMPLATES / "js_script_imports.j2").read_text()
    pinned = dict(re.findall(r"src=\"(https://[^\"]+)\"[^>]*integrity=\"sha384-([^\"]+)\"", text))
    assert len(pinned) == 2
    for url, digest in pinned.items():
        (local,) = CDN_ASSETS[url]
        assert base64.b64encode(hashlib.sha384((ASSETS_DIR / local).read_bytes()).digest()).decode() == digest


def _browser() -> list[str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("skipped: no chromium on this machine (Debian: apt-get install chromium)")
    # No network at all where we may make a namespace; otherwise every remote load goes to a dead proxy.
    if os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(
            ["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0:
        return ["unshare", "-n", chromium]
    return [chromium, "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]


def test_the_tables_render_in_a_browser_without_network(sites: dict[str, tuple[bool, Path]], tmp_path: Path) -> None:
    _, site = sites["warning"]
    (page,) = (site / "validations").rglob("*.html")
    for html, drawn in ((site / "index.html", "Showing 1 to 1 of 1 rows"), (page, "Succeeded with 1 warning")):
        dom = subprocess.run(
            [*_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
             "--virtual-time-budget=5000", "--dump-dom", html.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=True).stdout
        assert drawn in dom
        # bootstrap-table ran: it adds its classes to every table it builds.
        tables = re.findall(r"<table\b[^>]*data-toggle=\"table\"[^>]*>", dom) or re.findall(
            r"<table\b[^>]*class=\"[^\"]*table-bordered[^\"]*\"[^>]*>", dom)
        assert tables and all("table-bordered" in t for t in tables), tables

"""Data Docs that render offline: bundled assets instead of CDNs, and a check that nothing is fetched.

GX 1.x pages load Bootstrap, jQuery, bootstrap-table and Font Awesome from public CDNs, and build
their tables in the browser with bootstrap-table; GX has no option to serve these locally. In an
air-gapped hospital the tables stay empty. ``make_docs_offline`` copies the copies bundled in
``docs_assets/`` (see its SOURCES.md) into the site's ``static/vendor/`` and points every page at
them; ``offline_problems`` lists anything a page would still fetch or cannot find.
"""

from __future__ import annotations

import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dicomops import io

ASSETS_DIR = Path(__file__).parent / "docs_assets"
VENDOR = ("static", "vendor")
FONT_AWESOME = ("fontawesome-free-6.6.0/css/fontawesome.min.css", "fontawesome-free-6.6.0/css/solid.min.css")
FILTER_CONTROL_CSS = ("bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.css",)

# Every script and stylesheet URL of the GX 1.x templates -> the bundled files (under ASSETS_DIR)
# that replace it. Vega is left out (empty): GX draws charts only for distribution expectations,
# which the header suite does not use; offline_problems reports a page that draws one.
CDN_ASSETS: dict[str, tuple[str, ...]] = {
    "https://code.jquery.com/jquery-3.7.1.min.js": ("jquery-3.7.1/jquery.min.js",),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js":
        ("popper.js-1.12.9/popper.min.js",),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": ("bootstrap-4.3.1/js/bootstrap.min.js",),
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": ("bootstrap-4.3.1/css/bootstrap.min.css",),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        ("bootstrap-table-1.19.1/bootstrap-table.min.js",),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        ("bootstrap-table-1.19.1/bootstrap-table.min.css",),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        ("bootstrap-table-1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.js",),
    # The templates ask for the 1.19.0 filter-control styles next to 1.19.1 scripts; one version serves.
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        FILTER_CONTROL_CSS,
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        FILTER_CONTROL_CSS,
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        ("bootstrap-datepicker-1.9.0/css/bootstrap-datepicker.min.css",),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        ("bootstrap-datepicker-1.9.0/js/bootstrap-datepicker.min.js",),
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        ("bootstrap-dark-1.1.0/css/bootstrap-prefers-dark.min.css",),
    # The pages use solid icons only ("fas"), so the solid font replaces all five.
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": FONT_AWESOME,
    "https://cdn.jsdelivr.net/npm/vega@5": (),
    "https://cdn.jsdelivr.net/npm/vega-lite@5": (),
    "https://cdn.jsdelivr.net/npm/vega-embed@6": (),
}

# The logos GX loads from its web-assets bucket -> the images GX ships in the site's static/images.
GX_WEB_ASSETS = re.compile(
    r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/([\w.-]+)(?:\?[^\"')\s]*)?")
GX_IMAGES = {"logo-long.png": "logo-long.png", "full_logo_dark.png": "logo-long.png"}

_SCRIPT = re.compile(r"<script\b([^>]*)>\s*</script>", re.IGNORECASE)
_LINK = re.compile(r"<link\b([^>]*?)/?>", re.IGNORECASE)
_ATTR = re.compile(r"([\w-]+)\s*=\s*\"([^\"]*)\"")
# GX writes the favicon of a validation page one folder too shallow; every static/ reference is
# recomputed from where the page really is.
_STATIC_REF = re.compile(r"((?:src|href)=\")((?:\./|(?:\.\./)*)static/[^\"]*)\"")
_CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]+)['\"]?\s*\)")
_NOT_A_FILE = ("data:", "blob:", "#", "javascript:", "mailto:", "about:")


def _relative(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target, page.parent)).as_posix()


def _gx_images(text: str, page: Path, site: Path) -> str:
    return GX_WEB_ASSETS.sub(
        lambda m: _relative(site / "static" / "images" / GX_IMAGES[m.group(1)], page)
        if m.group(1) in GX_IMAGES else m.group(0), text)


def _localize(html: str, page: Path, site: Path) -> str:
    """`html` with every known CDN tag and GX logo pointing at the bundled copy in `site`."""
    vendor = site.joinpath(*VENDOR)

    def replace(match: re.Match[str], attr: str, tag: str) -> str:
        url = dict(_ATTR.findall(match.group(1))).get(attr, "")
        if url not in CDN_ASSETS:
            return match.group(0)
        # Without integrity and crossorigin: a browser refuses a CORS-mode script from file://.
        hrefs = [_relative(vendor / name, page) for name in CDN_ASSETS[url]]
        return "".join(tag.format(h) for h in hrefs)

    html = _SCRIPT.sub(lambda m: replace(m, "src", '<script src="{}"></script>'), html)
    html = _LINK.sub(lambda m: replace(m, "href", '<link rel="stylesheet" href="{}">')
                     if "stylesheet" in m.group(1) else m.group(0), html)
    html = _gx_images(html, page, site)

    def static(match: re.Match[str]) -> str:
        rest = match.group(2).split("static/", 1)[1]
        return f'{match.group(1)}{_relative(site / "static" / rest, page)}"'

    return _STATIC_REF.sub(static, html)


def _rewrite(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777
    io.write_text(path, text)
    os.chmod(path, mode)  # as GX wrote it: an atomic write's temporary file is private


def make_docs_offline(site: Path) -> list[Path]:
    """Bundle the Data Docs assets into `site` and rewrite its pages to load them; return the pages.

    Raises:
        ValueError: a page still loads something from the network or names a missing local file
            (a GX upgrade with new CDN URLs: bundle them and map them in ``CDN_ASSETS``).
    """
    site = Path(site).resolve()
    if not (ASSETS_DIR / "jquery-3.7.1" / "jquery.min.js").exists():
        raise ValueError(f"the bundled Data Docs assets are missing from {ASSETS_DIR}; reinstall dicomops "
                         "with its package data (dicomops/validation/docs_assets)")
    shutil.copytree(ASSETS_DIR, site.joinpath(*VENDOR), dirs_exist_ok=True)
    pages = sorted(site.rglob("*.html"))
    for page in pages:
        html = page.read_text(encoding="utf-8")
        offline = _localize(html, page, site)
        if offline != html:
            _rewrite(page, offline)
    # GX also copies its stylesheet (inlined in every page) to static/styles, logo URL and all.
    for sheet in sorted((site / "static" / "styles").glob("*.css")):
        css = sheet.read_text(encoding="utf-8")
        if (offline := _gx_images(css, sheet, site)) != css:
            _rewrite(sheet, offline)
    problems = offline_problems(site)
    if problems:
        raise ValueError("Data Docs would not render offline: " + "; ".join(problems[:10])
                         + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                         + ". Bundle the missing files in dicomops/validation/docs_assets and map "
                           "their URLs in dicomops.validation.docs.CDN_ASSETS")
    return pages


class _Loads(HTMLParser):
    """What a browser fetches on its own when it opens a page: scripts, styles, images, fonts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []
        self._style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "link" and values.get("href"):
            self.refs.append(values["href"])
        elif tag != "a" and values.get("src"):
            self.refs.append(values["src"])
        self.refs += _CSS_URL.findall(values.get("style", ""))
        self._style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._style = False

    def handle_data(self, data: str) -> None:
        if self._style:
            self.refs += _CSS_URL.findall(data)


def _is_remote(ref: str) -> bool:
    return ref.startswith("//") or urlsplit(ref).scheme.lower() in {"http", "https", "ftp", "ws", "wss"}


def _check(refs: list[str], base: Path, site: Path, where: str) -> list[str]:
    problems = []
    for ref in refs:
        ref = ref.strip()
        if not ref or ref.lower().startswith(_NOT_A_FILE):
            continue
        if _is_remote(ref):
            problems.append(f"{where} loads {ref} from the network")
            continue
        target = (base / unquote(urlsplit(ref).path)).resolve()
        if not target.is_file():
            problems.append(f"{where} names {ref}, which does not exist")
        elif not target.is_relative_to(site):
            problems.append(f"{where} names {ref}, which lies outside the site")
    return problems


def offline_problems(site: Path) -> list[str]:
    """What would break `site` in a browser without a network: remote scripts, styles, images and
    fonts, local ones that are missing, and charts that need the (unbundled) Vega libraries."""
    site = Path(site).resolve()
    problems: list[str] = []
    for page in sorted(site.rglob("*.html")):
        where = page.relative_to(site).as_posix()
        html = page.read_text(encoding="utf-8")
        parser = _Loads()
        parser.feed(html)
        parser.close()
        problems += _check(parser.refs, page.parent, site, where)
        if "vegaEmbed(" in html:
            problems.append(f"{where} draws a chart with Vega, which is not bundled")
    for sheet in sorted(site.rglob("*.css")):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        problems += _check(_CSS_URL.findall(text), sheet.parent, site, sheet.relative_to(site).as_posix())
    return problems

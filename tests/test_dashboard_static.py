"""The dashboard's files, without a browser: the page and everything it loads are served by the
coordinator itself, without a token (they hold no data), from the package (no CDN, so the page
works offline), and the package ships them; anything else under /static/ is a 404, and the
data routes the page reads still need the token. tests/test_dashboard_browser.py runs it."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from coordinator_helpers import client

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "coordinator" / "static"
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def test_the_page_and_all_it_loads_are_served_open_from_the_package(url):
    with client(url, token=None) as anon:
        page = anon.get("/")
        assert page.status_code == 200
        loads = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert "static/uPlot.iife.min.js" in loads and "static/dashboard.js" in loads, loads
        for ref in loads:
            if ref.startswith("data:"):
                continue
            assert not re.match(r"^[a-z]+://|^//", ref), f"{ref}: loaded from elsewhere"
            r = anon.get(f"/{ref}")
            assert r.status_code == 200, (ref, r.status_code)
            assert r.headers["content-type"].startswith(TYPES[Path(ref).suffix]), (ref, r.headers)
            assert r.content == (STATIC / Path(ref).name).read_bytes()
        for name in ("nothing.js", "..%2Fguard.py", "%2E%2E"):
            assert anon.get(f"/static/{name}").status_code in (401, 404), name
        for path in ("/workers", "/telemetry", "/training/status", "/islands/rounds"):
            assert anon.get(path).status_code == 401, path
    with client(url) as authed:
        assert authed.get("/static/nothing.js").status_code == 404


def test_the_package_ships_every_static_file():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["coordinator"]
    shipped = {p for g in globs for p in (ROOT / "coordinator").glob(g) if p.is_file()}
    assert {p for p in STATIC.rglob("*") if p.is_file()} <= shipped, globs
    assert "MIT License" in (STATIC / "uPlot.LICENSE").read_text()

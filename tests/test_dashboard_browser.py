"""The officer dashboard in a real headless browser: Debian's Chromium driven by Playwright,
against a real gateway process on a deployment with three datasets and admitted, charged,
refunded and denied jobs, at a desktop width (1280 px) and a phone width (390 px).
Full-page screenshots go to the test's temporary directory (never into the repository) and
are checked for layout sanity: the page is exactly as wide as the viewport (nothing overflows
sideways) and the key panels are visible and inside it.

Chromium comes from the system package manager (``make test-env`` installs it); Playwright's
own browser downloads are never used. Without Chromium the test is skipped, except in
CI, where that is a failure.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from urllib.parse import quote

import pytest

from gateway.cli.process import running_gateway
from tests.conftest import make_node
from tests.ledger_activity import demo_activity, login_token, more_datasets
from tests.test_audit_api import make_officer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTHS = (1280, 390)
KEY_ELEMENTS = ("header.top", ".verification .badge", "section.summary table", "svg.chart",
                "section.dataset .reading", "section.card h2 >> text=Denials by reason",
                "section.card h2 >> text=Recent decisions")


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is required in CI (make test-env installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} not installed (make test-env installs it)")
    return CHROMIUM


def png_width(path: Path) -> int:
    """The pixel width in a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int(struct.unpack(">I", data[16:20])[0])


def assert_fits_the_viewport(page, width: int) -> None:  # type: ignore[no-untyped-def]
    overflow = page.evaluate("() => [document.scrollingElement.scrollWidth, innerWidth]")
    assert overflow == [width, width], f"the page scrolls sideways at {width} px: {overflow}"
    for selector in KEY_ELEMENTS:
        element = page.locator(selector).first
        assert element.is_visible(), selector
        box = element.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, (
            selector, box)


def test_officer_signs_in_and_reads_the_dashboard_at_desktop_and_phone_widths(
    chromium: Path, tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import sync_playwright

    node_dir = make_node(tmp_path / "node", synthetic_table, f"sqlite:///{tmp_path / 'ledger.db'}",
                         monkeypatch)
    make_officer(node_dir)
    demo_activity(node_dir, spread_days=7)
    more_datasets(node_dir, synthetic_table)
    token = login_token(node_dir).token
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with running_gateway(node_dir, log_path=tmp_path / "gateway.log") as url, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            # Without a session a browser lands on the sign-in form, never on problem+json.
            anonymous = browser.new_context().new_page()
            refused = anonymous.goto(f"{url}/dashboard")
            assert refused is not None and refused.status == 200
            assert anonymous.url == f"{url}/dashboard/login"
            assert anonymous.locator("form.login input[name=token]").is_visible()

            page = browser.new_page(viewport={"width": WIDTHS[0], "height": 900})
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"{url}/dashboard/login?token={quote(token, safe='')}")
            page.wait_for_url(f"{url}/dashboard")  # the sign-in page moves on, token dropped

            assert page.locator("svg.chart").count() == 3
            assert page.locator("svg.chart path.series-filter").count() == 3
            assert page.locator("svg.chart path.series-sum").count() == 0  # the Σε line is gone
            assert page.locator("svg.chart circle.marker.committed").count() == 3
            assert page.locator("section.dataset h3").all_inner_texts() == [
                "demo", "loose-delta", "wide-budget"]
            assert page.locator("svg.chart text.y-label").first.inner_html() == "filter used (best order)"
            summary = page.locator("section.summary").inner_text()
            assert "ε_total 12 is very large" in summary and "above 1/N̂^1.1" in summary
            assert "more jobs like the last one" in page.locator("section.dataset").first.inner_text()
            assert page.locator(".verification .badge").inner_text() == "Verified"
            denials = page.locator("section.card", has_text="Denials by reason").inner_text()
            assert "budget-exceeded" in denials and "privacy filter of demo" in denials
            # The stylesheet ran under the CSP (its hash is allowed) and nothing was blocked.
            background = page.locator("header.top").evaluate("e => getComputedStyle(e).backgroundColor")
            assert background == "rgb(17, 24, 39)"

            for width in WIDTHS:
                page.set_viewport_size({"width": width, "height": 900})
                page.reload()
                assert_fits_the_viewport(page, width)
                shot = shots / f"dashboard-{width}.png"
                page.screenshot(path=str(shot), full_page=True)
                assert png_width(shot) == width and shot.stat().st_size > 10_000
                billing = browser.new_page(viewport={"width": width, "height": 900})
                billing.context.add_cookies(page.context.cookies())
                billing.goto(f"{url}/dashboard/billing")
                assert billing.evaluate("document.scrollingElement.scrollWidth") == width
                billing.close()
            assert not [m for m in console if "Content Security Policy" in m], console

            # The token was single-use: a second browser cannot sign in with it, and is told so
            # on a page with the sign-in form.
            second = browser.new_context().new_page()
            again = second.goto(f"{url}/dashboard/login?token={quote(token, safe='')}")
            assert again is not None and again.status == 401
            assert again.headers["content-type"].startswith("text/html")
            assert "already used" in second.locator("main").inner_text()
            assert second.locator("form.login input[name=token]").is_visible()
        finally:
            browser.close()
    print(f"screenshots: {shots}")

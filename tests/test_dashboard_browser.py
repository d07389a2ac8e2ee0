"""The officer dashboard in a real headless browser: Debian's Chromium driven by Playwright,
against a real gateway process on a demo deployment with admitted, charged, refunded and
denied jobs. Saves a screenshot to test-artifacts/dashboard.png.

Chromium comes from the system package manager (``make test-env`` installs it); Playwright's
own browser downloads are never used. Without Chromium the test is skipped, except in
CI, where that is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from gateway.cli.process import running_gateway
from tests.conftest import make_node
from tests.ledger_activity import demo_activity, login_token
from tests.test_audit_api import make_officer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is required in CI (make test-env installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} not installed (make test-env installs it)")
    return CHROMIUM


def test_officer_signs_in_with_a_token_and_sees_the_burn_down_chart(
    chromium: Path, tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import sync_playwright

    node_dir = make_node(tmp_path / "node", synthetic_table, f"sqlite:///{tmp_path / 'ledger.db'}",
                         monkeypatch)
    make_officer(node_dir)
    demo_activity(node_dir, spread_days=7)
    token = login_token(node_dir).token
    ARTIFACTS.mkdir(exist_ok=True)

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

            page = browser.new_page(viewport={"width": 1280, "height": 900})
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(f"{url}/dashboard/login?token={quote(token, safe='')}")
            page.wait_for_url(f"{url}/dashboard")  # the sign-in page moves on, token dropped

            assert page.locator("svg.chart").count() == 1
            assert page.locator("svg.chart path.series-filter").count() == 1
            assert page.locator("svg.chart circle.marker.committed").count() == 3
            assert page.locator("section.dataset h3").inner_text() == "demo"
            assert page.locator(".verification .badge").inner_text() == "Verified"
            assert "budget-exceeded" in page.locator("table").first.inner_text()
            # The stylesheet ran under the CSP (its hash is allowed) and nothing was blocked.
            background = page.locator("header.top").evaluate("e => getComputedStyle(e).backgroundColor")
            assert background == "rgb(17, 24, 39)"
            assert not [m for m in console if "Content Security Policy" in m], console
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

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
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

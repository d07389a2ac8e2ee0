"""The officer dashboard: sign-in by one-time token, session cookie, authorisation,
escaping and the numbers it shows — over real HTTP semantics (Starlette TestClient),
real Casbin policy and a real ledger on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from sqlmodel import select
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.api.app import create_app
from gateway.cli import main as fedgate
from gateway.dashboard.data import (
    BillingMonth,
    LogVerification,
    ResearcherBill,
    budget_warnings,
    denials_by_reason,
    load_billing,
    load_overview,
    parse_month,
)
from gateway.dashboard.pages import CONTENT_SECURITY_POLICY, STYLESHEET, billing_page
from gateway.dashboard.routes import SESSION_COOKIE
from gateway.node.billing import statement
from gateway.node.identity import VerifiedRequest
from gateway.node.node import Node
from gateway.protocol.problems import Problem
from gateway.sdk.request_signing import SignedRequestAuth
from ledger import keys
from ledger.audit import append_entry, read_entries
from ledger.burndown import burn_down, filter_usage
from ledger.metering import month_of
from ledger.models import AuditEntry, DashboardSession, DashboardToken, Dataset, Job, JobMeter
from ledger.officer_login import LoginRefused, OfficerLogin, exchange_login_token, secret_digest
from tests.conftest import make_researcher
from tests.ledger_activity import demo_activity, login_token, more_datasets, researcher, submit
from tests.test_audit_api import make_officer


def problem_type(response) -> str:  # type: ignore[no-untyped-def]
    assert response.headers["content-type"] == "application/problem+json", response.text
    return response.json()["type"].removeprefix("urn:fedgate:problem:")


def signed_in(client: TestClient, token: str) -> TestClient:
    response = client.get("/dashboard/login", params={"token": token})
    assert response.status_code == 200, response.text
    return client


# --- tokens and sessions --------------------------------------------------------------


def test_a_token_is_stored_only_as_its_digest_and_its_issuance_is_audited(node_dir: Path) -> None:
    make_officer(node_dir)
    issued = login_token(node_dir)
    node = Node(node_dir)
    with node.session() as s:
        row = s.get(DashboardToken, issued.token_id)
        entries = read_entries(s)
    assert row is not None and row.token_hash == hashlib.sha256(issued.token.encode()).hexdigest()
    assert row.key_id == issued.key_id and row.exchanged_at is None
    assert entries[-1] | {"timestamp": None, "seq": None, "expires": None} == {
        "action": "token", "decision": "issued", "actor": "owner-cli", "token_id": issued.token_id,
        "key_id": issued.key_id, "principal": "olivia", "timestamp": None, "seq": None,
        "expires": None}
    assert all(issued.token not in json.dumps(e) for e in entries)


def test_a_token_signs_in_once_with_an_httponly_samesite_strict_cookie(node_dir: Path) -> None:
    make_officer(node_dir)
    issued = login_token(node_dir)
    with TestClient(create_app(node_dir)) as browser:
        login = browser.get("/dashboard/login", params={"token": issued.token})
        page = browser.get("/dashboard")
        again = TestClient(browser.app).get("/dashboard/login", params={"token": issued.token})
    assert login.status_code == 200
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert {"HttpOnly", "Path=/dashboard", "SameSite=strict"} <= {a.strip() for a in cookie.split(";")}
    assert "Secure" not in cookie  # plain HTTP here; set over HTTPS
    assert 8 * 3600 - 60 < int(re.search(r"Max-Age=(\d+)", cookie).group(1)) <= 8 * 3600
    assert page.status_code == 200 and "demo" in page.text
    assert again.status_code == 401 and problem_type(again) == "login-required"
    node = Node(node_dir)
    with node.session() as s:
        sessions = s.exec(select(DashboardSession)).all()
        exchanged = [e for e in read_entries(s) if e.get("decision") == "exchanged"]
    value = cookie.split(";")[0].split("=", 1)[1]
    assert [r.session_hash for r in sessions] == [secret_digest(value)]  # the cookie is not stored
    assert [(e["action"], e["token_id"], e["principal"]) for e in exchanged] == [
        ("token", issued.token_id, "olivia")]


def test_the_sign_in_form_posts_the_token(node_dir: Path) -> None:
    make_officer(node_dir)
    issued = login_token(node_dir)
    with TestClient(create_app(node_dir)) as browser:
        form = browser.get("/dashboard/login")
        posted = browser.post("/dashboard/login", data={"token": issued.token})
        page = browser.get("/dashboard")
    assert form.status_code == 200 and 'name="token"' in form.text
    assert posted.status_code == 200 and SESSION_COOKIE in posted.headers["set-cookie"]
    assert page.status_code == 200


def test_dashboard_pages_answer_401_without_a_valid_session_cookie(node_dir: Path) -> None:
    make_officer(node_dir)
    with TestClient(create_app(node_dir)) as anonymous:
        missing = anonymous.get("/dashboard")
        anonymous.cookies.set(SESSION_COOKIE, "made-up", path="/dashboard")
        forged = anonymous.get("/dashboard")
        bad_token = anonymous.get("/dashboard/login", params={"token": "fgt_guess"})
    for response in (missing, forged, bad_token):
        assert response.status_code == 401
        assert problem_type(response) == "login-required"


def test_expired_tokens_and_sessions_are_refused(node_dir: Path) -> None:
    make_officer(node_dir)
    stale = login_token(node_dir, hours=1, now=time.time() - 3601)
    fresh = login_token(node_dir)
    node = Node(node_dir)
    with pytest.raises(LoginRefused), node.session() as s, s.begin():
        exchange_login_token(s, stale.token, now=time.time())
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, fresh.token)
        assert browser.get("/dashboard").status_code == 200
        with node.session() as s, s.begin():
            for row in s.exec(select(DashboardSession)).all():
                row.expires_at = time.time() - 1
                s.add(row)
        expired = browser.get("/dashboard")
    assert expired.status_code == 401 and problem_type(expired) == "login-required"


def test_revoking_the_officer_ends_the_session_at_the_next_request(node_dir: Path) -> None:
    make_officer(node_dir)
    issued = login_token(node_dir)
    unused = login_token(node_dir)
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, issued.token)
        assert browser.get("/dashboard").status_code == 200
        assert fedgate(["-d", str(node_dir), "officer", "revoke", "olivia"]) == 0
        after = browser.get("/dashboard")
        unused_login = TestClient(browser.app).get("/dashboard/login", params={"token": unused.token})
    assert after.status_code == 401 and problem_type(after) == "login-required"
    assert unused_login.status_code == 401


def test_sign_out_ends_the_session_and_clears_the_cookie(node_dir: Path) -> None:
    make_officer(node_dir)
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        value = browser.cookies.get(SESSION_COOKIE)
        out = browser.post("/dashboard/logout")
        browser.cookies.set(SESSION_COOKIE, value, path="/dashboard")  # a copied cookie
        replayed = browser.get("/dashboard")
    assert out.status_code == 200 and 'Max-Age=0' in out.headers["set-cookie"]
    assert replayed.status_code == 401


# --- refusals a person can read -------------------------------------------------------

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
                     "image/webp,*/*;q=0.8"}  # what Chromium and Firefox send when navigating


def html_page(response) -> str:  # type: ignore[no-untyped-def]
    assert response.headers["content-type"].startswith("text/html"), response.text
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    return response.text


def test_a_browser_without_a_valid_session_is_sent_to_the_sign_in_page(node_dir: Path) -> None:
    make_officer(node_dir)
    with TestClient(create_app(node_dir), follow_redirects=False) as browser:
        browser.headers.update(BROWSER)
        missing = [browser.get(path) for path in ("/dashboard", "/dashboard/billing?month=2026-11")]
        browser.cookies.set(SESSION_COOKIE, "made-up", path="/dashboard")
        forged = browser.get("/dashboard")
        followed = browser.get("/dashboard", follow_redirects=True)
    for response in (*missing, forged):
        assert response.status_code == 303 and response.headers["location"] == "/dashboard/login"
    assert "set-cookie" not in missing[0].headers
    assert f"{SESSION_COOKIE}=" in forged.headers["set-cookie"]  # the stale cookie is cleared
    assert "Max-Age=0" in forged.headers["set-cookie"]
    assert followed.status_code == 200 and 'name="token"' in html_page(followed)


def test_a_used_or_expired_token_gets_an_html_page_with_the_sign_in_form(node_dir: Path) -> None:
    make_officer(node_dir)
    used = login_token(node_dir)
    expired = login_token(node_dir, hours=1, now=time.time() - 3601)
    with TestClient(create_app(node_dir)) as first:
        signed_in(first, used.token)
    with TestClient(create_app(node_dir), headers=BROWSER) as browser:
        again = browser.get("/dashboard/login", params={"token": used.token})
        stale = browser.post("/dashboard/login", data={"token": expired.token})
        empty = browser.get("/dashboard/login", params={"token": ""})
    for response in (again, stale, empty):
        assert response.status_code == 401
        page = html_page(response)
        assert "unknown, expired or already used" in page and 'name="token"' in page
        assert "<script" not in page.lower()


def test_a_malformed_query_or_unknown_path_gets_an_html_page_in_a_browser(node_dir: Path) -> None:
    make_officer(node_dir)
    with TestClient(create_app(node_dir), headers=BROWSER) as browser:
        signed_in(browser, login_token(node_dir).token)
        month = browser.get("/dashboard/billing", params={"month": "<b>x</b>"})
        nowhere = browser.get("/dashboard/<i>nothing</i>")
        wrong_method = browser.post("/dashboard/billing")
    assert month.status_code == 422
    assert "month must be a month such as 2026-11" in html_page(month) and "<b>x" not in month.text
    assert nowhere.status_code == 404 and "<i>nothing" not in html_page(nowhere)
    assert "/dashboard/&lt;i&gt;nothing&lt;/i&gt;" in nowhere.text
    assert wrong_method.status_code == 405 and "POST is not allowed" in html_page(wrong_method)


@pytest.mark.parametrize("accept", ["application/json", "application/problem+json",
                                    "text/html, application/problem+json", "*/*", None])
def test_api_clients_still_get_problem_json_from_the_dashboard(node_dir: Path,
                                                               accept: str | None) -> None:
    make_officer(node_dir)
    headers = {"Accept": accept} if accept else {}
    with TestClient(create_app(node_dir), follow_redirects=False) as client:
        if accept is None:
            del client.headers["accept"]
        anonymous = client.get("/dashboard", headers=headers)
        bad_token = client.get("/dashboard/login", params={"token": "fgt_guess"}, headers=headers)
        signed_in(client, login_token(node_dir).token)
        bad_month = client.get("/dashboard/billing", params={"month": "2026-13"}, headers=headers)
        nowhere = client.get("/dashboard/nothing", headers=headers)
    assert (anonymous.status_code, problem_type(anonymous)) == (401, "login-required")
    assert (bad_token.status_code, problem_type(bad_token)) == (401, "login-required")
    assert (bad_month.status_code, problem_type(bad_month)) == (422, "invalid-request")
    assert (nowhere.status_code, problem_type(nowhere)) == (404, "not-found")


def test_a_browser_of_an_officer_the_policy_refuses_gets_an_html_403(node_dir: Path) -> None:
    key = keys.generate_private_key()
    _, public = keys.write_key_pair(key, node_dir / "trainee")
    assert fedgate(["-d", str(node_dir), "officer", "add", "trainee", "--public-key", str(public),
                    "--group", "trainees"]) == 0
    with TestClient(create_app(node_dir), headers=BROWSER) as browser:
        signed_in(browser, login_token(node_dir, "trainee").token)
        response = browser.get("/dashboard")
    assert response.status_code == 403
    assert "Denied by the data owner" in html_page(response) and "read-audit" in response.text


# --- who may use it -------------------------------------------------------------------


def test_researchers_get_no_token_and_their_signatures_do_not_open_the_dashboard(
    node_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_researcher(node_dir, "alice")
    assert fedgate(["-d", str(node_dir), "officer", "token", "alice"]) == 2
    assert "no active officer named 'alice'" in capsys.readouterr().err
    with TestClient(create_app(node_dir)) as client:
        client.auth = SignedRequestAuth(alice)
        response = client.get("/dashboard")
    assert response.status_code == 401 and problem_type(response) == "login-required"
    node = Node(node_dir)
    with node.session() as s:
        assert s.exec(select(DashboardToken)).all() == []


def test_an_officer_the_policy_does_not_allow_to_read_audit_is_refused_and_audited(
    node_dir: Path,
) -> None:
    key = keys.generate_private_key()
    _, public = keys.write_key_pair(key, node_dir / "trainee")
    assert fedgate(["-d", str(node_dir), "officer", "add", "trainee", "--public-key", str(public),
                    "--group", "trainees"]) == 0
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir, "trainee").token)
        response = browser.get("/dashboard")
    assert response.status_code == 403 and problem_type(response) == "policy-denied"
    node = Node(node_dir)
    with node.session() as s:
        denial = read_entries(s)[-1]
    assert (denial["action"], denial["principal"], denial["request_action"]) == (
        "deny", "trainee", "read-audit")


def test_only_the_sign_in_and_sign_out_routes_work_without_a_session(node_dir: Path) -> None:
    app = create_app(node_dir)
    pages = [r.path for r in app.routes if isinstance(r, Route) and r.path.startswith("/dashboard")
             and r.path not in ("/dashboard/login", "/dashboard/logout", "/dashboard/{path:path}")]
    assert pages == ["/dashboard", "/dashboard/billing"]
    with TestClient(app) as anonymous:
        for path in pages:
            assert anonymous.get(path).status_code == 401
        # The exemption covers the dashboard's own paths only, never a longer name or /v1.
        for path in ("/dashboard-admin", "/dashboardx", "/v1/audit/export", "/v1/datasets"):
            response = anonymous.get(path)
            assert response.status_code == 401 and problem_type(response) == "signature-missing"
        assert anonymous.get("/dashboard/nothing-here").status_code == 404


# --- what it shows --------------------------------------------------------------------


def test_pages_are_escaped_and_run_under_a_strict_content_security_policy(node_dir: Path) -> None:
    make_officer(node_dir)
    node = Node(node_dir)
    alice = researcher(node_dir)
    attack = '<script>alert("x")</script>'
    assert submit(node, alice, dataset=attack).slug == "unknown-dataset"  # type: ignore[union-attr]
    with node.session() as s, s.begin():
        append_entry(s, action="deny", decision="deny", reason="policy-denied",
                     principal='"><img src=x onerror=alert(1)>', rule=["p", "<b>bold</b>"],
                     explanation="</td></tr></table><h1>forged</h1>", request_action="train")
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        page = browser.get("/dashboard")
    html = page.text
    for raw in (attack, "<img src=x", "<b>bold</b>", "<h1>forged</h1>"):
        assert raw not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script" not in html.lower()
    csp = page.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY and csp.startswith("default-src 'none';")
    style_hash = base64.b64encode(hashlib.sha256(STYLESHEET.encode()).digest()).decode()
    assert f"'sha256-{style_hash}'" in csp and f"<style>{STYLESHEET}</style>" in html
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"


def test_overview_shows_the_burn_down_denials_and_recent_decisions(node_dir: Path) -> None:
    make_officer(node_dir)
    demo_activity(node_dir)
    overview = load_overview(Node(node_dir))
    (chart,) = overview.datasets
    assert [p.budget_state for p in chart.points] == ["committed"] * 3  # the refund is gone
    assert chart.matches_ledger
    assert chart.points[-1].filter_used == chart.current.fraction
    assert {(g.reason, g.count) for g in overview.denials} == {("budget-exceeded", 1),
                                                                ("unknown-dataset", 1)}
    assert overview.recent[0]["action"] == "deny"
    assert {e["action"] for e in overview.recent} >= {"admit", "deny", "charge", "refund", "key"}
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        html = browser.get("/dashboard").text
    assert html.count('<svg class="chart"') == 1
    assert html.count('<circle class="marker committed"') == 3
    assert "Privacy filter used" in html and "Not drawn: the sum of the jobs' ε" in html
    assert f"{chart.current.fraction:.1%}" in html


def test_recent_decisions_name_the_researcher_of_a_charge_and_show_registrations(
    node_dir: Path,
) -> None:
    """A charge, refund or release is acted by the node (its key or ``gateway``), but the row
    names the researcher whose job it is; dataset and key registrations are decisions too."""
    make_officer(node_dir)
    activity = demo_activity(node_dir)
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        html = browser.get("/dashboard").text
    recent = html.split("<h2>Recent decisions</h2>")[1].split("</table>")[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", recent):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        if cells:
            rows.setdefault(re.sub(r"<[^>]+>", "", cells[2]), []).append(cells)
    charged = {job.id for job in activity["committed"]}
    charges = [c for c in rows["charge"] if re.sub(r"<[^>]+>", "", c[6]) in charged]
    assert len(charges) == 3 and {c[4] for c in charges} == {"alice"}
    assert [c[4] for c in rows["refund"]] == ["alice"]
    (registration,) = rows["dataset"]
    assert (registration[3], registration[5]) == ("registered", "demo")
    assert "ε_total 4; δ 1e-05; N̂ 480; N̂ declared" in registration[8]
    assert {c[4] for c in rows["key"]} >= {"alice", "olivia"}


def test_many_datasets_get_a_summary_table_with_warnings_above_their_charts(
    node_dir: Path, synthetic_table: Path
) -> None:
    make_officer(node_dir)
    demo_activity(node_dir)
    more_datasets(node_dir, synthetic_table)
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        html = browser.get("/dashboard").text
    (chart,) = [c for c in load_overview(Node(node_dir)).datasets if c.dataset == "demo"]
    summary = html[html.index('<section class="card summary">'):]
    summary = summary[:summary.index("</section>")]
    assert html.index('<section class="card summary">') < html.index('<section class="card dataset"')
    rows = {re.sub(r"<[^>]+>", "", cells[0]): cells for cells in
            (re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", summary))
            if cells}
    assert list(rows) == ["demo", "loose-delta", "wide-budget"]  # by name, as the charts
    assert rows["demo"][1:7] == [f"{chart.epsilon_used:.3g} / 4", "1e-05", "480",
                                 f"{chart.current.fraction:.1%}", "3 / 0", str(chart.more_like_last)]
    assert 0 < chart.epsilon_used < 4 and rows["demo"][7] == "—"
    assert rows["wide-budget"][1] == "0 / 12" and rows["wide-budget"][6] == "—"
    assert "ε_total 12 is very large" in rows["wide-budget"][7]
    assert "δ 0.0015 is above 1/N̂^1.1" in rows["loose-delta"][7]
    assert html.count('<section class="card dataset"') == 3
    for name in rows:  # each row links to its dataset's card
        anchor = re.search(rf'<a href="#(dataset-[0-9a-f]+)">{name}</a>', summary).group(1)
        assert f'<section class="card dataset" id="{anchor}">' in html


def test_budget_warnings_flag_delta_against_public_count_and_a_full_filter() -> None:
    from ledger.burndown import BurnDown, FilterUsage

    def chart(**changes: object) -> BurnDown:
        fields = dict(dataset="d", epsilon_total=4.0, delta=1e-5, public_users=480, start=0.0,
                      points=(), current=FilterUsage(0.2, 8.0), orders=13, epsilon_used=1.0,
                      more_like_last=None, matches_ledger=True) | changes
        return BurnDown(**fields)  # type: ignore[arg-type]

    assert budget_warnings(chart()) == ()
    (delta,) = budget_warnings(chart(delta=1 / 400))
    assert delta.startswith("δ 0.0025 ≥ 1/N̂ = 0.00208")
    assert budget_warnings(chart(current=FilterUsage(0.93, 8.0), more_like_last=2)) == (
        "the filter is 93% used",)
    assert budget_warnings(chart(more_like_last=0)) == ("the filter admits no more job like the last one",)
    assert budget_warnings(chart(matches_ledger=False)) == (
        "the jobs' charges do not add up to the ledger's total",)


def test_budget_use_is_the_filter_at_its_best_order_not_the_sum_of_epsilons(node_dir: Path) -> None:
    """20-round jobs (ε ≈ 2.2 each) on ε_total 4 until the filter refuses one: by then their ε
    add up to well over the budget, yet the filter (what admits) is not full. The chart must
    not present the sum as what limits."""
    node = Node(node_dir)
    alice = researcher(node_dir)
    admitted: list[Job] = []
    while len(admitted) < 10 and isinstance(outcome := submit(node, alice), Job):
        admitted.append(outcome)
    assert isinstance(outcome, Problem) and outcome.slug == "budget-exceeded", outcome
    with node.session() as s:
        dataset = s.get(Dataset, "demo")
        chart = burn_down(dataset, s.exec(select(Job)).all())
    assert [p.job_id for p in chart.points] == [job.id for job in admitted]
    epsilon_sum = sum(p.epsilon for p in chart.points)
    assert epsilon_sum / chart.epsilon_total > 1.5 and 0.5 < chart.current.fraction < 1, chart
    assert chart.epsilon_used < chart.epsilon_total and chart.more_like_last == 0
    assert [p.filter_used for p in chart.points] == sorted(p.filter_used for p in chart.points)
    assert chart.points[-1].filter_used == chart.current.fraction and chart.matches_ledger


def test_filter_usage_is_the_smallest_used_fraction_over_the_budgeted_orders() -> None:
    spent = (Fraction(1), Fraction(1), Fraction(5))
    budget = (Fraction(2), Fraction(4), Fraction(0))
    usage = filter_usage(spent, budget, (2.0, 4.0, 8.0))
    assert (usage.fraction, usage.best_order) == (0.25, 4.0)
    assert filter_usage(spent, (Fraction(0),) * 3, (2.0, 4.0, 8.0)).fraction == 1.0


def test_denials_are_grouped_by_reason_and_rule_most_frequent_first() -> None:
    entries = [
        {"seq": 1, "action": "deny", "reason": "budget-exceeded", "explanation": "old",
         "request_action": "train"},
        {"seq": 2, "action": "admit"},
        {"seq": 3, "action": "deny", "reason": "policy-denied", "rule": ["p", "bob", "deny"],
         "explanation": "deny rule", "request_action": "train"},
        {"seq": 4, "action": "deny", "reason": "budget-exceeded", "explanation": "new",
         "request_action": "train"},
    ]
    groups = denials_by_reason(entries)
    assert [(g.reason, g.rule, g.count, g.latest_explanation) for g in groups] == [
        ("budget-exceeded", None, 2, "new"), ("policy-denied", "p, bob, deny", 1, "deny rule")]


def test_deny_entries_record_the_rule_that_decided_and_the_dashboard_shows_it(
    node_dir: Path,
) -> None:
    """A deny row, a violated constraint, a missing grant and the privacy filter each name
    themselves in the ``deny`` entry; a refusal no rule decides (unknown dataset) names none."""
    policy = node_dir / "policies" / "policy.csv"
    policy.write_text(policy.read_text() + "p, mallory, owner, demo, train, deny\n"
                      "p2, researchers, owner, demo, train, max_rounds, 100\n")
    make_officer(node_dir)
    node = Node(node_dir)
    alice, mallory = researcher(node_dir, "alice"), researcher(node_dir, "mallory")
    visitor_key = make_researcher(node_dir, "visitor", group="visitors")  # no row grants visitors
    visitor = VerifiedRequest(key_id=keys.key_id(visitor_key.public_key()), principal="visitor",
                              role="researcher", nonce="n", nonce_expires_at=0.0)
    assert submit(node, mallory).slug == "policy-denied"  # type: ignore[union-attr]
    assert submit(node, alice, rounds=150).slug == "policy-denied"  # type: ignore[union-attr]
    # The visitor is told the dataset is not visible; the audit keeps the policy's reason.
    assert submit(node, visitor).slug == "unknown-dataset"  # type: ignore[union-attr]
    assert isinstance(submit(node, alice), Job) and isinstance(submit(node, alice), Job)
    assert submit(node, alice, rounds=100).slug == "budget-exceeded"  # type: ignore[union-attr]
    assert submit(node, alice, dataset="nothing").slug == "unknown-dataset"  # type: ignore[union-attr]
    with node.session() as s:
        denials = [e for e in read_entries(s) if e["action"] == "deny"]
    assert [e.get("rule") for e in denials] == [
        ["p", "mallory", "owner", "demo", "train", "deny"],
        ["p2", "researchers", "owner", "demo", "train", "max_rounds", "100"],
        [],
        "privacy filter of demo: ε_total 4, δ 1e-05",
        None]
    groups = {g.reason + " / " + str(g.rule) for g in load_overview(node).denials}
    assert groups == {"policy-denied / p, mallory, owner, demo, train, deny",
                      "policy-denied / p2, researchers, owner, demo, train, max_rounds, 100",
                      "policy-denied / no rule grants it",
                      "budget-exceeded / privacy filter of demo: ε_total 4, δ 1e-05",
                      "unknown-dataset / None"}
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        html = browser.get("/dashboard").text
    denials_table = html.split("<h2>Denials by reason</h2>")[1].split("</table>")[0]
    assert "<th>decided by</th>" in denials_table
    assert "<td>p, mallory, owner, demo, train, deny</td>" in denials_table
    assert "<td>privacy filter of demo: ε_total 4, δ 1e-05</td>" in denials_table
    assert "<td>no rule grants it</td>" in denials_table


def test_a_request_no_rule_grants_is_recorded_as_such() -> None:
    from gateway.dashboard.data import NO_GRANT, deciding_rule

    assert deciding_rule({"action": "deny", "reason": "policy-denied", "rule": []}) == NO_GRANT
    assert deciding_rule({"action": "deny", "reason": "invalid-request"}) is None


def test_verification_status_is_cached_and_reports_a_tampered_entry(node_dir: Path) -> None:
    make_officer(node_dir)
    node = Node(node_dir)
    verification = LogVerification(node, ttl=30.0)
    first = verification.status(now=1000.0)
    assert first.ok and first.summary[0].startswith("OK:")
    with node.session() as s, s.begin():
        row = s.exec(select(AuditEntry).where(AuditEntry.entry.contains('"olivia"'))).first()
        row.entry = row.entry.replace('"olivia"', '"mallory"')
        s.add(row)
    assert verification.status(now=1029.0) is first  # cached for the ttl
    later = verification.status(now=1030.0)
    assert not later.ok
    assert any("modified-entries" in line or "malformed-entry" in line for line in later.summary)


def test_chart_axis_reaches_past_the_largest_value_in_round_steps() -> None:
    from gateway.dashboard.chart import burn_down_svg
    from ledger.burndown import BurnDown, BurnDownPoint, FilterUsage

    point = BurnDownPoint(time=100.0, job_id="job-1", researcher="<alice>", budget_state="committed",
                          epsilon=6.6, filter_used=0.63, best_order=5.0, parameters={"rounds": 9})
    chart = BurnDown(dataset="demo", epsilon_total=4.0, delta=1e-5, public_users=480, start=0.0,
                     points=(point,), current=FilterUsage(0.63, 5.0), orders=13, epsilon_used=3.0,
                     more_like_last=0, matches_ledger=True)
    svg = burn_down_svg(chart, now=200.0)
    assert re.findall(r'class="tick"[^>]*>(\d+)%<', svg) == ["0", "25", "50", "75", "100", "125"]
    assert "by &lt;alice&gt;" in svg and "<alice>" not in svg


def test_the_chart_draws_the_filter_only_with_labelled_axes_and_says_what_is_left(
    node_dir: Path,
) -> None:
    """The sum of the jobs' ε (165 % here, while the filter is at about two-thirds) is not
    drawn; both axes say what they measure; the card says how many more jobs like the last
    one fit, and that number is the filter's real answer: exactly that many copies are
    admitted, the next is refused."""
    make_officer(node_dir)
    demo_activity(node_dir)
    node = Node(node_dir)
    (chart,) = load_overview(node).datasets
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        html = browser.get("/dashboard").text
    svg = html[html.index('<svg class="chart"'):html.index("</svg>", html.index('<svg class="chart"'))]
    assert "series-sum" not in html and "Σ" not in svg
    assert sum(p.epsilon for p in chart.points) / chart.epsilon_total > 1.5  # what it used to show
    assert '<text class="axis-label y-label"' in svg and ">filter used (best order)</text>" in svg
    assert ">time (UTC) · one dot per job</text>" in svg
    assert chart.more_like_last is not None and chart.more_like_last >= 1
    assert f"<b>about {chart.more_like_last}</b><span>more jobs like the last one</span>" in html
    assert f"The best order now is <b>α = {chart.current.best_order:g}</b>" in html
    assert "rounds 20, noise multiplier 1, expected clients per round 20" in html
    bob = researcher(node_dir, "bob")
    admitted = [submit(node, bob) for _ in range(chart.more_like_last)]
    assert all(isinstance(job, Job) for job in admitted), admitted
    refused = submit(node, bob)
    assert isinstance(refused, Problem) and refused.slug == "budget-exceeded"


def test_epsilon_used_inverts_the_filter_budget_and_is_zero_before_any_charge() -> None:
    from ledger.accounting import FILTER_ORDERS, filter_budget, zero
    from ledger.burndown import epsilon_used

    for epsilon_total, delta in ((4.0, 1e-5), (0.5, 1e-7), (30.0, 1e-3)):
        budget = filter_budget(epsilon_total=epsilon_total, delta=delta)
        assert epsilon_used(budget, FILTER_ORDERS, delta) == pytest.approx(epsilon_total, abs=1e-9)
    assert epsilon_used(zero(), FILTER_ORDERS, 1e-5) == 0.0


def test_the_owner_cli_prints_a_login_url_and_bounds_the_lifetime(
    node_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_officer(node_dir)
    capsys.readouterr()
    assert fedgate(["-d", str(node_dir), "officer", "token", "olivia", "--hours", "2", "--json"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert issued["login_url"] == (f"http://127.0.0.1:8620/dashboard/login?token={issued['token']}")
    assert 2 * 3600 - 60 < issued["expires_at"] - time.time() <= 2 * 3600
    for hours in ("0", "169"):
        assert fedgate(["-d", str(node_dir), "officer", "token", "olivia", "--hours", hours]) == 2


# --- billing ----------------------------------------------------------------------------

PRICES = """
[billing]
currency = "EUR"
per_cpu_hour = 0.05
per_job = 0.1
per_epsilon = 1.5
"""


def charged_jobs(node_dir: Path) -> tuple[Node, list[Job]]:
    """Alice's two and Bob's one job, charged as the runner settles a job that failed after
    reading data (metered, priced, ``bill`` audited); the exact client counts are 987654."""
    from engine.launcher import JobOutcome
    from engine.meter import ResourceUsage
    from gateway.node.deployment import Deployment
    from gateway.node.jobs import JobRunner

    config = Deployment(node_dir).config_path
    config.write_text(config.read_text() + PRICES)
    node = Node(node_dir)
    usage = ResourceUsage(cpu_seconds=360.5, cpu_user_seconds=350.0, cpu_system_seconds=10.5,
                          cpu_sampled_seconds=360.0, wall_seconds=200.0, max_rss_bytes=2 * 10**9,
                          peak_tree_rss_bytes=3 * 10**9)
    alice, bob = researcher(node_dir, "alice"), researcher(node_dir, "bob")
    jobs = []
    for who in (alice, bob, alice):
        job = submit(node, who, rounds=3)
        assert isinstance(job, Job), job
        JobRunner(node)._settle(job.id, JobOutcome(succeeded=False, data_accessed=True,
                                                   release_path=None, failure="exit 1", usage=usage))
        jobs.append(job)
    with node.session() as s, s.begin():
        for meter in s.exec(select(JobMeter)).all():
            meter.client_updates = 987654
            s.add(meter)
    return node, jobs


def test_the_billing_page_needs_a_dashboard_session(node_dir: Path) -> None:
    make_officer(node_dir)
    with TestClient(create_app(node_dir)) as anonymous:
        response = anonymous.get("/dashboard/billing", params={"month": "2026-11"})
    assert response.status_code == 401 and problem_type(response) == "login-required"


def test_the_billing_page_lists_each_researchers_charges_and_totals_equal_the_audit_log(
        node_dir: Path) -> None:
    make_officer(node_dir)
    node, jobs = charged_jobs(node_dir)
    month = month_of(time.time())
    with node.session() as s:
        statements = {name: statement(s, researcher=name, month=month) for name in ("alice", "bob")}
        bills = [e for e in read_entries(s) if e["action"] == "bill" and e["month"] == month]
    audited = sum((Decimal(e["total"]) for e in bills), Decimal(0))
    billing = load_billing(node, month)
    assert [(r.researcher, r.statement) for r in billing.researchers] == sorted(statements.items())
    assert billing.totals == billing.audit_totals == {"EUR": str(audited)} and audited > 0
    assert billing.matches_audit_log and billing.audit_bills == 3
    assert billing.researchers[0].cpu_hours == 8  # two jobs that read data: 4 h reservations
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        overview = browser.get("/dashboard").text
        page = browser.get("/dashboard/billing", params={"month": month})
        current = browser.get("/dashboard/billing")
    assert '<a href="/dashboard/billing">Billing</a>' in overview
    assert page.status_code == 200 and current.text.split("shown at")[0] == page.text.split("shown at")[0]
    html = page.text
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "<script" not in html.lower() and "Matches the audit log" in html
    assert all(job.id in html for job in jobs)
    for document in statements.values():
        assert f'{document["totals"]["EUR"]} EUR' in html
        assert all(f'{line["total"]} EUR' in html and f'#{line["audit_seq"]}' in html
                   for line in document["lines"])
    assert f"{audited} EUR" in html
    assert "987654" not in html  # the exact client-update count never appears
    assert all("client_updates" not in line for d in statements.values() for line in d["lines"])


def test_the_billing_page_flags_statements_that_do_not_match_the_audit_log(node_dir: Path) -> None:
    make_officer(node_dir)
    node, _ = charged_jobs(node_dir)
    month = month_of(time.time())
    with node.session() as s, s.begin():  # a bill entry without its charge row
        append_entry(s, action="bill", actor="owner-cli", job_id="job-forged", researcher="alice",
                     dataset="demo", month=month, currency="EUR", total="1.000000")
    billing = load_billing(node, month)
    assert not billing.matches_audit_log and billing.audit_bills == 4
    html = billing_page(billing, _login(), now=time.time())
    assert "Does NOT match the audit log" in html


def test_a_malformed_billing_month_is_a_clean_422(node_dir: Path) -> None:
    make_officer(node_dir)
    with TestClient(create_app(node_dir)) as browser:
        signed_in(browser, login_token(node_dir).token)
        responses = [browser.get("/dashboard/billing", params={"month": month})
                     for month in ("2026-13", "2026-1", "26-11", "", "9999-12", "2026-11-01", "<b>x</b>")]
        empty = browser.get("/dashboard/billing", params={"month": "2001-01"})
    for response in responses:
        assert response.status_code == 422 and problem_type(response) == "invalid-request"
        assert response.json()["field"] == "month" and "<b>" not in response.text
    assert empty.status_code == 200 and "No job was charged in 2001-01" in empty.text
    assert parse_month(None, now=0.0) == "1970-01"


def _login() -> OfficerLogin:
    return OfficerLogin(officer="olivia", key_id="k", expires_at=time.time() + 60)


def test_the_billing_page_escapes_researcher_and_ledger_values() -> None:
    line = {"job_id": "<i>job</i>", "dataset": '"><script>x</script>', "charged_at": "2026-11-01T00:00:00Z",
            "audit_seq": 7, "rounds_run": 3, "expected_client_updates": 12.5, "cpu_seconds": "1.000000",
            "wall_seconds": "2.000000", "peak_memory_bytes": 10**6, "total": "0.1", "currency": "<u>E</u>"}
    document = {"researcher": "<img src=x>", "month": "2026-11", "lines": [line],
                "totals": {"<u>E</u>": "0.1"}}
    billing = BillingMonth(owner="<owner>", month="2026-11",
                           researchers=(ResearcherBill("<img src=x>", document, Decimal(1) / 3600),),
                           totals={"<u>E</u>": "0.1"}, audit_totals={"<u>E</u>": "0.1"}, audit_bills=1)
    html = billing_page(billing, _login(), now=0.0)
    for raw in ("<i>job", "<script>x", "<u>E", "<img src=x>", "<owner>"):
        assert raw not in html
    assert "&lt;img src=x&gt;" in html and "&lt;i&gt;job&lt;/i&gt;" in html
    assert "MB" not in html and 'href="#researcher-0"' in html  # no metered memory


def test_a_browser_posting_an_oversized_sign_in_form_gets_an_html_413(node_dir: Path) -> None:
    # The body limit refuses before any dashboard code runs; a browser still gets a page.
    with TestClient(create_app(node_dir), headers=BROWSER) as browser:
        response = browser.post("/dashboard/login", data={"token": "x" * 2_000_000})
    assert response.status_code == 413
    assert "body limit" in html_page(response)
    with TestClient(create_app(node_dir)) as api_client:
        assert problem_type(api_client.post("/dashboard/login", data={"token": "x" * 2_000_000})
                            ) == "payload-too-large"

"""HTML of the officer dashboard (pure: values in, text out).

Security invariants:

* Every value that comes from the ledger (dataset names, principals, explanations, rule
  cells — many researcher-supplied) goes through ``html.escape`` before it reaches the
  page, in text and in attributes alike; CSS class names are only ever chosen from
  fixed sets.
* The pages load nothing: no script, no external stylesheet, font or image. The one
  inline stylesheet is allowed by its SHA-256 in ``CONTENT_SECURITY_POLICY``, which
  forbids everything else (``default-src 'none'``), framing and foreign form targets.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Sequence
from html import escape
from typing import Any

from gateway.dashboard.chart import burn_down_svg
from gateway.dashboard.data import (
    DECISION_ACTIONS,
    BillingMonth,
    DenialGroup,
    Overview,
    ResearcherBill,
    VerificationStatus,
    budget_warnings,
)
from gateway.protocol.problems import Problem
from ledger.burndown import BurnDown
from ledger.officer_login import OfficerLogin
from ledger.states import BudgetState

STYLESHEET = """
:root { --ink: #1f2933; --muted: #5f6b7a; --line: #d9dee5; --card: #fff; --bg: #f3f5f8;
  --filter: #1d4ed8; --ok: #15803d; --bad: #b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header.top { display: flex; justify-content: space-between; align-items: center; gap: 16px;
  padding: 12px 28px; background: #111827; color: #e5e7eb; }
header.top .brand { font-size: 17px; font-weight: 600; color: #fff; }
header.top .brand span { font-weight: 400; color: #9ca3af; margin-left: 6px; }
header.top .who { display: flex; align-items: center; gap: 14px; font-size: 13px; }
header.top button { background: transparent; color: #e5e7eb; border: 1px solid #4b5563;
  border-radius: 6px; padding: 4px 10px; font: inherit; cursor: pointer; }
header.top nav { display: flex; gap: 14px; font-size: 13.5px; }
header.top nav a { color: #d1d5db; text-decoration: none; }
header.top nav a.here { color: #fff; font-weight: 600; }
.month-nav { display: flex; gap: 12px; align-items: center; margin: 0 0 18px; font-size: 13px; }
.month-nav input { padding: 3px 6px; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
.month-nav button { padding: 3px 10px; border: 1px solid var(--line); border-radius: 6px;
  background: #fff; font: inherit; cursor: pointer; }
tr.total td { font-weight: 600; border-top: 1px solid var(--line); }
main { max-width: 1120px; margin: 0 auto; padding: 22px 28px 40px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 0; }
.lead { color: var(--muted); margin: 0 0 18px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 16px 20px; margin-bottom: 18px; }
.verdict { display: flex; align-items: baseline; gap: 12px; }
.badge { display: inline-block; border-radius: 999px; padding: 2px 10px; font-size: 12px;
  font-weight: 600; color: #fff; }
.ok .badge, .badge.ok { background: var(--ok); }
.bad .badge, .badge.bad { background: var(--bad); }
.verification.bad { border-color: var(--bad); }
pre { margin: 8px 0 0; white-space: pre-wrap; word-break: break-all;
  font: 12.5px/1.5 ui-monospace, "DejaVu Sans Mono", monospace; color: #374151; }
.meta { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; }
.dataset-head { display: flex; justify-content: space-between; align-items: baseline; gap: 12px;
  flex-wrap: wrap; }
.stats { display: flex; gap: 22px; flex-wrap: wrap; margin: 10px 0 4px; }
.stat b { display: block; font-size: 18px; }
.stat span { color: var(--muted); font-size: 12.5px; }
.warning { color: var(--bad); font-weight: 600; }
.reading { margin: 8px 0 0; color: #374151; font-size: 13px; max-width: 80ch; }
svg.chart { width: 100%; height: auto; display: block; margin-top: 6px; }
svg.chart text { font-size: 11.5px; fill: var(--muted); }
svg.chart .grid { stroke: #e8ebf0; stroke-width: 1; }
svg.chart .axis { stroke: #9aa5b1; stroke-width: 1; }
svg.chart .limit { stroke: var(--bad); stroke-width: 1.5; stroke-dasharray: 2 3; }
svg.chart text.limit-label { fill: var(--bad); paint-order: stroke; stroke: #fff; stroke-width: 4px; }
svg.chart text.empty { font-size: 13px; }
svg.chart text.axis-label { fill: var(--ink); font-weight: 600; }
svg.chart .series-filter { fill: none; stroke: var(--filter); stroke-width: 2.5; }
svg.chart .marker { stroke: var(--filter); stroke-width: 2; }
svg.chart .marker.committed { fill: var(--filter); }
svg.chart .marker.reserved { fill: #fff; }
ul.legend { list-style: none; padding: 0; margin: 8px 0 0; color: #374151; font-size: 13px; }
ul.legend li { display: flex; gap: 10px; align-items: flex-start; margin: 4px 0; }
ul.legend svg { flex: none; margin-top: 3px; }
.swatch-filter { stroke: var(--filter); stroke-width: 3; }
.swatch-marker { stroke: var(--filter); stroke-width: 2; fill: var(--filter); }
.swatch-marker.hollow { fill: #fff; }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
th { text-align: left; color: var(--muted); font-weight: 600; border-bottom: 1px solid var(--line);
  padding: 6px 8px; white-space: nowrap; }
td { border-bottom: 1px solid #eef0f3; padding: 6px 8px; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.nowrap { white-space: nowrap; }
td.details { color: #374151; max-width: 420px; overflow-wrap: anywhere; }
code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
.action { display: inline-block; border-radius: 4px; padding: 0 6px; font-size: 12px;
  font-weight: 600; background: #e5e7eb; color: #374151; }
.action-admit, .action-release { background: #dcfce7; color: #166534; }
.action-deny { background: #fee2e2; color: #991b1b; }
.action-charge { background: #dbeafe; color: #1e40af; }
.action-refund { background: #fef3c7; color: #92400e; }
.action-dataset, .action-key { background: #ede9fe; color: #5b21b6; }
.empty-note { color: var(--muted); margin: 0; }
form.login { display: flex; gap: 10px; margin-top: 12px; }
form.login input { flex: 1; padding: 8px 10px; border: 1px solid var(--line); border-radius: 6px;
  font: inherit; }
form.login button { padding: 8px 16px; border: 0; border-radius: 6px; background: var(--filter);
  color: #fff; font: inherit; cursor: pointer; }
ul.warnings { margin: 0; padding: 0 0 0 16px; }
ul.warnings li { font-weight: 600; }
.summary td.num { white-space: nowrap; }
header.top { flex-wrap: wrap; }
.month-nav { flex-wrap: wrap; }
.reading, .lead, td.details { overflow-wrap: anywhere; }
@media (max-width: 640px) {
  header.top { padding: 10px 14px; gap: 8px 14px; }
  header.top .who { flex-wrap: wrap; gap: 8px; }
  main { padding: 14px 10px 28px; }
  .card { padding: 12px 12px; }
  .stats { gap: 12px 18px; }
  form.login { flex-direction: column; }
  table.stack thead { display: none; }
  table.stack tr { display: block; border-bottom: 1px solid var(--line); padding: 6px 0; }
  table.stack td { display: flex; justify-content: space-between; gap: 12px; border: 0;
    padding: 3px 4px; text-align: right; white-space: normal; }
  svg.chart text { font-size: 19px; }
  table.stack td::before { content: attr(data-label); color: var(--muted); font-weight: 600;
    text-align: left; }
}
"""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(STYLESHEET.encode()).digest()).decode()}'; "
    "img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # the login URL carries a token
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}

DETAILS_SHOWN = 160  # characters of an explanation shown inline; the rest is in the tooltip


def overview_page(overview: Overview, verification: VerificationStatus, login: OfficerLogin,
                  *, now: float) -> str:
    """The dashboard: log verification, budget per dataset, denials, recent decisions."""
    body = [
        _top_bar(overview.owner, login),
        "<main>",
        "<h1>Compliance overview</h1>",
        f'<p class="lead">Node of {escape(overview.owner)} · audit log of {overview.log_size} entries '
        f"· shown at {_time(now)} UTC. Read-only: nothing here changes the node.</p>",
        _verification_card(verification),
        "<h2>Privacy budget</h2>",
        _summary_card(overview.datasets),
        *(_dataset_card(chart, now) for chart in overview.datasets),
        "" if overview.datasets else '<section class="card"><p class="empty-note">No dataset is '
                                     "registered.</p></section>",
        _denials_card(overview.denials),
        _recent_card(overview.recent, overview.job_researchers),
        "</main>",
    ]
    return _page("fedgate · officer dashboard", "".join(body))


def billing_page(billing: BillingMonth, login: OfficerLogin, *, now: float) -> str:
    """One month's charges: per researcher, then per job, reconciled with the audit log.

    Shows what a researcher's statement shows (rounds and *expected* client updates, never
    the exact client-update count: docs/billing.md), so the page may be shown to them."""
    month = escape(billing.month)
    body = [
        _top_bar(billing.owner, login, "billing"),
        "<main>",
        f"<h1>Billing · {month}</h1>",
        f'<p class="lead">Compute charges of the node of {escape(billing.owner)} in {month} (UTC, by '
        f"settlement time) · shown at {_time(now)} UTC. The same numbers as <code>fedgate billing "
        "statement</code>; each job cites its <code>bill</code> audit entry.</p>",
        _month_nav(billing.month),
        _reconciliation_card(billing),
        _researchers_card(billing),
        *(_statement_card(index, bill) for index, bill in enumerate(billing.researchers)),
        "</main>",
    ]
    return _page(f"fedgate · billing {billing.month}", "".join(body))


def _month_nav(month: str) -> str:
    year, number = map(int, month.split("-"))
    previous = f"{year - (number == 1):04d}-{(number - 2) % 12 + 1:02d}"
    following = f"{year + (number == 12):04d}-{number % 12 + 1:02d}"
    return ('<div class="month-nav">'
            f'<a href="/dashboard/billing?month={escape(previous)}">← {escape(previous)}</a>'
            f'<a href="/dashboard/billing?month={escape(following)}">{escape(following)} →</a>'
            '<form method="get" action="/dashboard/billing"><input type="month" name="month" '
            f'value="{escape(month)}" aria-label="month" required> <button type="submit">Show'
            "</button></form></div>")


def _money(totals: dict[str, str]) -> str:
    return "<br>".join(f"{escape(total)} {escape(currency)}" for currency, total in totals.items()) or "0"


def _reconciliation_card(billing: BillingMonth) -> str:
    state, verdict = (("ok", "Matches the audit log") if billing.matches_audit_log else
                      ("bad", "Does NOT match the audit log"))
    warning = ("" if billing.matches_audit_log else
               '<p class="warning">The statements below do not add up to the audit log\'s '
               "<code>bill</code> entries of this month: export and verify the log, and compare "
               "with <code>fedgate billing statement</code>.</p>")
    return (f'<section class="card verification {state}"><div class="verdict"><h2>Totals</h2>'
            f'<span class="badge">{verdict}</span></div><div class="stats">'
            f'<div class="stat"><b>{_money(billing.totals)}</b><span>charged in {escape(billing.month)}'
            "</span></div>"
            f'<div class="stat"><b>{_money(billing.audit_totals)}</b><span>sum of the audit log\'s '
            f"{billing.audit_bills} <code>bill</code> entries</span></div></div>{warning}</section>")


def _researchers_card(billing: BillingMonth) -> str:
    if not billing.researchers:
        return ('<section class="card"><h2>By researcher</h2><p class="empty-note">No job was '
                f"charged in {escape(billing.month)}.</p></section>")
    rows = "".join(
        f'<tr><td><a href="#researcher-{index}">{escape(bill.researcher)}</a></td>'
        f'<td class="num">{len(bill.statement["lines"])}</td>'
        f'<td class="num">{bill.cpu_hours:.4f}</td>'
        f'<td class="num">{_money(bill.statement["totals"])}</td></tr>'
        for index, bill in enumerate(billing.researchers))
    return ('<section class="card"><h2>By researcher</h2><div class="table-wrap"><table><thead>'
            "<tr><th>researcher</th><th>jobs</th><th>CPU-hours</th><th>spend</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div></section>")


def _statement_card(index: int, bill: ResearcherBill) -> str:
    rows = "".join(_charge_row(line) for line in bill.statement["lines"])
    totals = "".join(
        f'<tr class="total"><td colspan="6">total</td><td class="num">{escape(total)} '
        f"{escape(currency)}</td><td></td></tr>" for currency, total in bill.statement["totals"].items())
    return (f'<section class="card" id="researcher-{index}"><h3>{escape(bill.researcher)}</h3>'
            f'<p class="meta">{_jobs(len(bill.statement["lines"]))} · {bill.cpu_hours:.4f} CPU-hours. '
            "Client updates are the expected number, never the exact count, as on the "
            "researcher's statement.</p>"
            '<div class="table-wrap"><table><thead><tr><th>job</th><th>dataset</th>'
            "<th>charged (UTC)</th><th>rounds</th><th>expected client updates</th>"
            "<th>CPU s billed</th><th>total</th><th>audit</th></tr></thead>"
            f"<tbody>{rows}{totals}</tbody></table></div></section>")


def _jobs(count: int) -> str:
    return f"{count} job" if count == 1 else f"{count} jobs"


def _charge_row(line: dict[str, Any]) -> str:
    def cell(key: str) -> str:
        value = line.get(key)
        return "—" if value is None else escape(str(value))

    return ("<tr>"
            f'<td class="nowrap"><code>{cell("job_id")}</code></td><td>{cell("dataset")}</td>'
            f'<td class="nowrap">{escape(_short_time(str(line.get("charged_at", ""))))}</td>'
            f'<td class="num">{cell("rounds_run")}</td>'
            f'<td class="num">{cell("expected_client_updates")}</td>'
            f'<td class="num">{cell("cpu_seconds")}</td>'
            f'<td class="num">{cell("total")} {cell("currency")}</td>'
            f'<td class="num">#{cell("audit_seq")}</td></tr>')


LOGIN_FORM = ('<form class="login" method="post" action="/dashboard/login">'
              '<input type="password" name="token" autocomplete="off" aria-label="login token" '
              'placeholder="fgt_…" required><button type="submit">Sign in</button></form>')


def login_form_page() -> str:
    return _page("fedgate · sign in", (
        '<main><section class="card"><h1>Officer dashboard</h1>'
        '<p class="lead">Sign in with the one-time login token the data owner issued for you '
        "(<code>fedgate officer token NAME</code>). A token works once. Sessions end at their "
        "expiry, at sign-out, and when your officer key is revoked or rotated; then sign in "
        f"again with a new token.</p>{LOGIN_FORM}</section></main>"))


def problem_page(problem: Problem) -> str:
    """A refusal for a person in a browser: the problem's title and detail, and the way on
    (the sign-in form after a refused token, else the overview). The same facts as the
    problem+json an API client gets, nothing more."""
    if problem.slug == "login-required":
        way_on = LOGIN_FORM
    elif problem.slug == "policy-denied":  # the overview would refuse too
        way_on = ""
    else:
        way_on = ('<p class="meta"><a href="/dashboard">Back to the overview</a> · '
                  '<a href="/dashboard/billing">Billing</a></p>')
    return _page(f"fedgate · {problem.title}", (
        f'<main><section class="card problem"><h1>{escape(problem.title)}</h1>'
        f'<p class="lead">{escape(problem.detail)}</p>{way_on}'
        f'<p class="meta">HTTP {problem.status} · <code>{escape(problem.type_uri)}</code></p>'
        "</section></main>"))


def signed_in_page(login: OfficerLogin) -> str:
    """Sent with the session cookie; moves on to the dashboard and drops the token URL."""
    return _page("fedgate · signed in", (
        f'<main><section class="card"><h1>Signed in as {escape(login.officer)}</h1>'
        f'<p class="lead">Your session lasts until {_time(login.expires_at)} UTC. '
        '<a href="/dashboard">Continue to the dashboard</a>.</p></section></main>'),
        head='<meta http-equiv="refresh" content="0; url=/dashboard">')


def signed_out_page() -> str:
    return _page("fedgate · signed out", (
        '<main><section class="card"><h1>Signed out</h1><p class="lead">The session has ended. '
        'Signing in again needs a new token: <a href="/dashboard/login">sign in</a>.</p>'
        "</section></main>"))


def _page(title: str, body: str, *, head: str = "") -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,">{head}<title>{escape(title)}</title>'
            f"<style>{STYLESHEET}</style></head><body>{body}</body></html>")


NAVIGATION = (("overview", "/dashboard", "Overview"), ("billing", "/dashboard/billing", "Billing"))


def _top_bar(owner: str, login: OfficerLogin, here: str = "overview") -> str:
    current = ' class="here" aria-current="page"'
    links = "".join(f'<a href="{href}"{current if name == here else ""}>{label}</a>'
                    for name, href, label in NAVIGATION)
    return (f'<header class="top"><div class="brand">fedgate<span>officer dashboard · '
            f"{escape(owner)}</span></div><nav>{links}</nav>"
            f'<div class="who"><span>signed in as <b>{escape(login.officer)}</b> '
            f"(<code>{escape(login.key_id)}</code>) until {_time(login.expires_at)} UTC</span>"
            '<form method="post" action="/dashboard/logout"><button type="submit">Sign out'
            "</button></form></div></header>")


def _verification_card(status: VerificationStatus) -> str:
    state, verdict = ("ok", "Verified") if status.ok else ("bad", "NOT verified")
    warning = (f'<p class="warning">{escape(status.warning)}</p>' if status.warning else "")
    return (f'<section class="card verification {state}"><div class="verdict">'
            f'<h2>Audit log verification</h2><span class="badge">{verdict}</span></div>'
            f"<pre>{escape(chr(10).join(status.summary))}</pre>{warning}"
            f'<p class="meta">A fresh export checked against the node public key, as '
            f"<code>fedgate audit verify</code> does, at {_time(status.checked_at)} UTC (at most "
            "every 30 s). Verify an export yourself with the key the owner gave you: a node "
            "cannot vouch for itself.</p></section>")


SUMMARY_COLUMNS = ("dataset", "ε used / ε_total", "δ", "N̂", "filter used",
                   "jobs committed / reserved", "more like the last", "warnings")
SUMMARY_NUMERIC = frozenset(SUMMARY_COLUMNS[1:-1])


def _summary_card(charts: Sequence[BurnDown]) -> str:
    """One row per dataset, above the per-dataset charts: the budget at a glance, warnings."""
    if not charts:
        return ""
    rows = []
    for chart in charts:
        committed = sum(p.budget_state == BudgetState.COMMITTED for p in chart.points)
        warnings = budget_warnings(chart)
        flagged = ('<ul class="warnings">' + "".join(f'<li class="warning">{escape(w)}</li>'
                                                   for w in warnings) + "</ul>") if warnings else "—"
        cells = [
            f'<a href="#{_anchor(chart.dataset)}">{escape(chart.dataset)}</a>',
            f"{chart.epsilon_used:.3g} / {chart.epsilon_total:g}",
            f"{chart.delta:g}",
            str(chart.public_users),
            f"{chart.current.fraction:.1%}",
            f"{committed} / {len(chart.points) - committed}",
            "—" if chart.more_like_last is None else str(chart.more_like_last),
            flagged,
        ]
        numeric = ' class="num"'
        rows.append("<tr>" + "".join(
            f'<td data-label="{label}"{numeric if label in SUMMARY_NUMERIC else ""}>{cell}</td>'
            for label, cell in zip(SUMMARY_COLUMNS, cells, strict=True)) + "</tr>")
    head = "".join(f"<th>{label}</th>" for label in SUMMARY_COLUMNS)
    return ('<section class="card summary"><h3>All datasets</h3><div class="table-wrap">'
            f'<table class="stack"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            "</table></div>"
            '<p class="meta">ε used is the smallest ε_total whose filter (same δ, same orders) '
            "would hold every job charged so far; it reaches ε_total exactly when the filter is "
            "full. It is not the sum of the jobs' ε.</p></section>")


def _dataset_card(chart: BurnDown, now: float) -> str:
    committed = sum(p.budget_state == BudgetState.COMMITTED for p in chart.points)
    reserved = len(chart.points) - committed
    order = f"at α = {chart.current.best_order:g}" if chart.current.best_order is not None else ""
    mismatch = ("" if chart.matches_ledger else
                '<p class="warning">The jobs\' charges do not add up to the ledger\'s running '
                "total for this dataset: the chart cannot be trusted; export and verify the "
                "log.</p>")
    more = "—" if chart.more_like_last is None else f"about {chart.more_like_last}"
    stats = [
        (f"{chart.current.fraction:.1%}", f"privacy filter used {order}"),
        (more, "more jobs like the last one"),
        (f"{chart.epsilon_total:g}", "ε_total"),
        (f"{chart.delta:g}", "δ"),
        (f"{committed} / {reserved}", "jobs committed / reserved"),
    ]
    return (f'<section class="card dataset" id="{_anchor(chart.dataset)}"><div class="dataset-head">'
            f"<h3>{escape(chart.dataset)}</h3></div>"
            '<div class="stats">'
            + "".join(f'<div class="stat"><b>{escape(v)}</b><span>{escape(label)}</span></div>'
                      for v, label in stats)
            + f"</div>{mismatch}{_reading(chart)}{burn_down_svg(chart, now=now)}{_legend()}"
            "</section>")


def _anchor(dataset: str) -> str:
    """A fragment id for a dataset's card: its name's hex digest (names may hold any text)."""
    return "dataset-" + hashlib.sha256(dataset.encode()).hexdigest()[:12]


def _reading(chart: BurnDown) -> str:
    """The chart in words: which order decides and why, and what is left in real jobs."""
    usage = chart.current
    if usage.best_order is None:
        return ('<p class="reading">No RDP order of this filter has a budget: it admits '
                "nothing.</p>")
    if not chart.points and usage.fraction == 0:
        return (f'<p class="reading">The filter keeps a separate budget at each of {chart.orders} '
                "Rényi orders α and admits a job while any one of them has room for it. No job "
                "has been charged yet: every order has its whole budget.</p>")
    best = (f"The filter keeps a separate budget at each of {chart.orders} Rényi orders α and "
            f"admits a job while any one of them has room for it. The best order now is "
            f"<b>α = {usage.best_order:g}</b>: it has the most room left ({usage.fraction:.1%} of "
            "its budget used), so it decides what still fits. Which order that is depends on "
            "the jobs charged: large-ε jobs (many rounds, little noise) use up the high orders "
            "fastest and move the best order down; small-ε jobs leave a high order best.")
    if not chart.points:  # only the public-count estimate is charged
        return f'<p class="reading">{best} No job has been charged yet.</p>'
    last = chart.points[-1]
    shape = ", ".join(f"{label} {last.parameters[key]:g}"
                      for key, label in (("rounds", "rounds"), ("noise_multiplier", "noise multiplier"),
                                         ("clients_per_round", "expected clients per round"))
                      if isinstance(last.parameters.get(key), int | float))
    count = chart.more_like_last or 0
    left = (f"About <b>{count}</b> more job{'s' if count != 1 else ''} like it would be admitted"
            if count else "No more job like it would be admitted (a smaller one may be)")
    return (f'<p class="reading">{best} The last job, <code>{escape(last.job_id)}</code> '
            f"({escape(shape)}; ε {last.epsilon:.3g}), was charged at {last.filter_used:.1%}. "
            f"{left}: the filter's answer for copies of its exact charge, one after another.</p>")


def _legend() -> str:
    def line(css: str) -> str:
        return (f'<svg width="30" height="10" aria-hidden="true"><line class="{css}" x1="1" x2="29" '
                'y1="5" y2="5"/></svg>')

    def dot(hollow: bool) -> str:
        return (f'<svg width="30" height="12" aria-hidden="true"><circle class="swatch-marker'
                f'{" hollow" if hollow else ""}" cx="15" cy="6" r="4"/></svg>')

    return ('<ul class="legend">'
            f'<li>{line("swatch-filter")}<span><b>Privacy filter used</b>, at its best RDP order '
            "(the order with the most room left). <b>This is what limits admission</b>: a job is "
            "admitted only if some order still has room for it, and at 100 % none has.</span></li>"
            f"<li>{dot(False)}{dot(True)}<span>one job each: filled = committed (charged for "
            "good), hollow = reserved (queued, running or awaiting review; refunded if it fails "
            "before reading data). Refunded jobs are not shown.</span></li></ul>"
            '<p class="meta">Not drawn: the sum of the jobs\' ε. Under Rényi-DP composition the ε '
            "of separate jobs does not add up, so that sum is not the budget spent (it passes "
            "100 % while jobs are still admitted).</p>")


def _denials_card(groups: Sequence[DenialGroup]) -> str:
    if not groups:
        return ('<section class="card"><h2>Denials by reason</h2>'
                '<p class="empty-note">No request has been denied.</p></section>')
    rows = "".join(
        f'<tr><td class="num">{g.count}</td><td><code>{escape(g.reason)}</code></td>'
        f"<td>{escape(g.rule) if g.rule else '—'}</td>"
        f'<td class="nowrap">{escape(", ".join(g.request_actions))}</td>'
        f'<td class="nowrap">{escape(_short_time(g.last_seen))}</td>'
        f"<td class=\"details\">{_clipped(g.latest_explanation)}</td></tr>"
        for g in groups)
    return ('<section class="card"><h2>Denials by reason</h2><div class="table-wrap"><table>'
            "<thead><tr><th>count</th><th>reason</th><th>decided by</th><th>requested</th>"
            "<th>last</th><th>latest explanation</th></tr></thead><tbody>"
            f"{rows}</tbody></table></div></section>")


def _recent_card(entries: Sequence[dict[str, Any]], job_researchers: dict[str, str]) -> str:
    if not entries:
        return ('<section class="card"><h2>Recent decisions</h2>'
                '<p class="empty-note">No decision yet.</p></section>')
    rows = "".join(_decision_row(e, job_researchers) for e in entries)
    return (f'<section class="card"><h2>Recent decisions</h2><p class="meta">The latest '
            f"{len(entries)} admit, deny, charge, refund, release, review, policy, key and dataset "
            "entries (registrations included), newest first. For a job's charge, refund or "
            "release the principal is the job's researcher; the node key that acted is in "
            "the entry.</p><div class=\"table-wrap\"><table><thead><tr><th>seq</th>"
            "<th>time (UTC)</th><th>action</th>"
            "<th>decision</th><th>principal</th><th>dataset</th><th>job</th><th>ε</th>"
            f"<th>reason / details</th></tr></thead><tbody>{rows}</tbody></table></div></section>")


def _principal(entry: dict[str, Any], job_researchers: dict[str, str]) -> str:
    """Who the entry is about: its principal, else the researcher of its job (a charge,
    refund or release is acted by the node key on a researcher's job), else its actor."""
    return str(entry.get("principal") or job_researchers.get(str(entry.get("job_id")))
               or entry.get("actor") or "")


def _decision_row(entry: dict[str, Any], job_researchers: dict[str, str]) -> str:
    action = str(entry.get("action", ""))
    css = f"action action-{action}" if action in DECISION_ACTIONS else "action"
    epsilon = entry.get("epsilon")
    epsilon_text = f"{epsilon:.3g}" if isinstance(epsilon, int | float) else ""
    cells = [
        f'<td class="num">{escape(str(entry.get("seq", "")))}</td>',
        f'<td class="nowrap">{escape(_short_time(str(entry.get("timestamp", ""))))}</td>',
        f'<td><span class="{css}">{escape(action)}</span></td>',
        f'<td>{escape(str(entry.get("decision", "")))}</td>',
        f'<td class="nowrap">{escape(_principal(entry, job_researchers))}</td>',
        f'<td>{escape(str(entry.get("dataset", "")))}</td>',
        f'<td class="nowrap"><code>{escape(str(entry.get("job_id", "")))}</code></td>',
        f'<td class="num">{epsilon_text}</td>',
        f'<td class="details">{_clipped(_details(entry))}</td>',
    ]
    return f"<tr>{''.join(cells)}</tr>"


def _details(entry: dict[str, Any]) -> str:
    """The entry's reason in words: why it was denied, admitted, charged, held, reloaded..."""
    reason, explanation = entry.get("reason"), entry.get("explanation")
    if reason and explanation:
        return f"{reason}: {explanation}"
    parts = [str(entry[k]) for k in ("reason", "review", "policy_explanation", "role")
             if entry.get(k)]
    if entry.get("action") == "policy" and entry.get("policy_version"):
        parts.append(f"version {str(entry['policy_version'])[:19]}…")
    if entry.get("action") == "dataset":
        parts += [f"{label} {entry[key]:g}" for key, label in (
            ("epsilon_total", "ε_total"), ("delta", "δ"), ("public_users", "N̂"))
            if isinstance(entry.get(key), int | float)]
        if entry.get("public_users_source"):
            parts.append(f"N̂ {entry['public_users_source']}")
    return "; ".join(parts)


def _clipped(text: str) -> str:
    if len(text) <= DETAILS_SHOWN:
        return escape(text)
    return f'<span title="{escape(text)}">{escape(text[:DETAILS_SHOWN - 1])}…</span>'


def _short_time(timestamp: str) -> str:
    """``2026-11-25T10:42:00.123456Z`` → ``2026-11-25 10:42:00``."""
    return timestamp.replace("T", " ").split(".")[0].removesuffix("Z")


def _time(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

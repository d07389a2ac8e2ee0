"""The officer dashboard's routes: sign-in by one-time token, session cookie, pages.

``SignatureAuthMiddleware`` lets ``/dashboard`` and ``/dashboard/...`` through unsigned
(browsers cannot sign RFC 9421 requests); this module is their authentication:

* ``GET /dashboard/login?token=...`` or ``POST /dashboard/login`` (form field ``token``)
  trades a token from ``fedgate officer token NAME`` for a session (``ledger.officer_login``)
  and sets it as a cookie: ``HttpOnly`` (no script can read it), ``SameSite=Strict`` (no
  other site can make the browser send it), ``Path=/dashboard``, ``Secure`` over HTTPS,
  expiring with the session. ``GET /dashboard/login`` alone shows the sign-in form.
* ``GET /dashboard/billing?month=YYYY-MM`` shows a month's compute charges per researcher
  and job (``gateway.node.billing.statement``), reconciled with the audit log's ``bill`` entries;
  a malformed month is ``422 invalid-request``.
* Every other dashboard page is wrapped in ``officer_page``: without a live session of an
  active officer key it refuses with ``401 login-required``; if the policy does not allow
  that officer ``read-audit`` it answers ``403 policy-denied`` (audited, as for the
  signed audit API). Nothing is read before both checks pass.
* ``POST /dashboard/logout`` ends the session and clears the cookie.

Pages are read-only and carry a strict Content-Security-Policy (``gateway.dashboard.pages``).

Refusals are for people when a browser asks (``wants_html``: its ``Accept`` names
``text/html`` and no JSON type): an officer page without a live session redirects (303) to
the sign-in form, any other refusal is an HTML page with the problem's status, title and
detail. Every other client (``Accept: application/json``, ``application/problem+json``,
``*/*`` or none) gets the same RFC 9457 problem+json as every other API refusal. Unknown
paths under ``/dashboard/`` are answered the same way (``not-found``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.dashboard import pages
from gateway.dashboard.data import LogVerification, load_billing, load_overview, parse_month
from gateway.node.audit import authorise_audit_reader
from gateway.node.node import Node
from gateway.protocol.problems import Problem
from ledger.officer_login import (
    LoginRefused,
    OfficerLogin,
    end_session,
    exchange_login_token,
    session_login,
)

log = logging.getLogger("fedgate.dashboard")

SESSION_COOKIE = "fedgate_dashboard"
COOKIE_PATH = "/dashboard"
MAX_TOKEN_CHARS = 128

OfficerPage = Callable[[Request, OfficerLogin], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]
LOGIN_PATH = "/dashboard/login"


class Dashboard:
    """The dashboard of one node; holds the cached log verification."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.verification = LogVerification(node)

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", _for_people(self.officer_page(self.overview))),
            Route("/dashboard/billing", _for_people(self.officer_page(self.billing))),
            Route(LOGIN_PATH, _for_people(self.login), methods=["GET", "POST"]),
            Route("/dashboard/logout", _for_people(self.logout), methods=["POST"]),
        ]

    def officer_page(self, page: OfficerPage) -> Callable[[Request], Awaitable[Response]]:
        """Wrap ``page`` so it runs only for a live session allowed to ``read-audit``."""

        async def authenticated(request: Request) -> Response:
            login = await run_in_threadpool(self._authorised_login, request.cookies.get(SESSION_COOKIE))
            return await page(request, login)

        return authenticated

    def _authorised_login(self, cookie: str | None) -> OfficerLogin:
        """The session's login, or the ``Problem`` that refuses it (blocking)."""
        with self.node.session() as s:
            login = session_login(s, cookie, now=time.time()) if cookie else None
        if login is None:
            raise Problem("login-required", "this page needs a dashboard session: sign in at "
                          "/dashboard/login with a token from the data owner (`fedgate officer "
                          "token NAME`); sessions end at their expiry, at sign-out, and when the "
                          "officer's key is revoked or rotated")
        authorise_audit_reader(self.node, subject=login.officer, key_id=login.key_id)
        return login

    async def overview(self, request: Request, login: OfficerLogin) -> Response:
        def render() -> str:
            now = time.time()
            return pages.overview_page(load_overview(self.node), self.verification.status(now),
                                                 login, now=now)

        return _html(await run_in_threadpool(render))

    async def billing(self, request: Request, login: OfficerLogin) -> Response:
        """``?month=YYYY-MM`` (UTC; default the current month): every researcher's charges."""
        now = time.time()
        try:
            month = parse_month(request.query_params.get("month"), now=now)
        except ValueError:
            raise Problem("invalid-request", "month must be a month such as 2026-11 (YYYY-MM, UTC)",
                          field="month") from None

        def render() -> str:
            return pages.billing_page(load_billing(self.node, month), login, now=now)

        return _html(await run_in_threadpool(render))

    async def login(self, request: Request) -> Response:
        if request.method == "POST":
            _same_origin(request)
            token = _form_token(request.scope.get("fedgate.body", b""))
        else:
            token = request.query_params.get("token")
            if token is None:
                return _html(pages.login_form_page())
        value, login = await run_in_threadpool(self._exchange, token)
        response = _html(pages.signed_in_page(login))
        response.set_cookie(SESSION_COOKIE, value, max_age=max(0, int(login.expires_at - time.time())),
                            path=COOKIE_PATH, secure=request.url.scheme == "https", httponly=True,
                            samesite="strict")
        return response

    def _exchange(self, token: str) -> tuple[str, OfficerLogin]:
        refused = Problem("login-required", "the login token is unknown, expired or already used; "
                          "ask the data owner for a new one (`fedgate officer token NAME`)")
        if not token.isascii() or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise refused
        try:
            with self.node.session() as s, s.begin():
                value, login = exchange_login_token(s, token, now=time.time())
        except LoginRefused:
            raise refused from None
        log.info("dashboard sign-in by officer key %s", login.key_id)
        return value, login

    async def logout(self, request: Request) -> Response:
        _same_origin(request)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            await run_in_threadpool(self._end, cookie)
        response = _html(pages.signed_out_page())
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, secure=request.url.scheme == "https",
                               httponly=True, samesite="strict")
        return response

    def _end(self, cookie: str) -> None:
        with self.node.session() as s, s.begin():
            end_session(s, cookie)


def wants_html(request: Request) -> bool:
    """Whether the client is a browser navigating: its ``Accept`` header names ``text/html``
    and neither ``application/json`` nor ``application/problem+json`` (types with ``q=0``
    count as not named). ``*/*`` alone, as curl and HTTP libraries send, is not a browser."""
    named = {media_type for media_type, quality in _media_ranges(request.headers.get("accept", ""))
             if quality > 0}
    return "text/html" in named and not named & {"application/json", "application/problem+json"}


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """``(media type, q)`` of each range of an ``Accept`` header; a malformed ``q`` is 0."""
    ranges = []
    for media_range in accept.split(","):
        media_type, *parameters = (part.strip().lower() for part in media_range.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranges.append((media_type, quality))
    return ranges


def _for_people(endpoint: Endpoint) -> Endpoint:
    """``endpoint``, answering a browser's refusals with HTML (module docstring); other
    clients' refusals propagate to the app's problem+json handlers unchanged."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Problem as problem:
            if not wants_html(request):
                raise
            return _refusal_for_browser(request, problem)
        except Exception:
            if not wants_html(request):
                raise
            log.exception("dashboard page %s failed", request.url.path)
            return _refusal_for_browser(request, Problem(
                "internal-error", "the node could not show this page; nothing was changed"))

    return answer


def _refusal_for_browser(request: Request, problem: Problem) -> Response:
    """A sign-in redirect for an officer page without a session, else the problem as HTML."""
    if problem.slug == "login-required" and request.url.path != LOGIN_PATH:
        # A relative Location: the Host header is never reflected (tests/test_gateway_surface.py).
        response: Response = RedirectResponse(LOGIN_PATH, status_code=303,
                                              headers=pages.SECURITY_HEADERS)
        if SESSION_COOKIE in request.cookies:  # stale: expired, ended or revoked
            response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH,
                                   secure=request.url.scheme == "https", httponly=True,
                                   samesite="strict")
        return response
    return HTMLResponse(pages.problem_page(problem), status_code=problem.status,
                        headers=pages.SECURITY_HEADERS)


def page_refusal(request: Request, status: int) -> Response | None:
    """The HTML answer to a browser that asked the dashboard for a page it does not have (404)
    or with a method the page does not take (405); None for any other request, which the app
    answers with problem+json. The app's HTTP error handler calls it, so the dashboard needs
    no catch-all route (the OpenAPI document lists exactly the mounted routes)."""
    path = request.url.path
    if status == 405:
        problem = Problem("method-not-allowed", f"{request.method} is not allowed on {path}")
    else:
        problem = Problem("not-found", f"the dashboard has no page {path}; its pages are "
                          "/dashboard (overview) and /dashboard/billing")
    return browser_refusal(request, problem)


def browser_refusal(request: Request, problem: Problem) -> Response | None:
    """``problem`` as the HTML page (or sign-in redirect) a browser gets from the dashboard,
    for a browser's request to a dashboard path refused before any page ran (the app's error
    handlers, the body-size limit); None for any other request, which gets problem+json."""
    path = request.url.path
    if not (path == "/dashboard" or path.startswith("/dashboard/")) or not wants_html(request):
        return None
    return _refusal_for_browser(request, problem)


def _same_origin(request: Request) -> None:
    """A browser form POST must come from this node's own pages: its ``Origin`` (browsers
    send it on every cross-site POST) must be the origin the request was addressed to.
    Refuses a cross-site sign-in or sign-out (login CSRF); requests without ``Origin``
    (curl, the CLI) pass, as the session cookie is SameSite=Strict anyway."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin.rstrip("/").lower() != own.lower():
        raise Problem("policy-denied", "cross-site form posts to the dashboard are refused; "
                      "sign in from this node's own /dashboard/login page")


def _form_token(body: bytes) -> str:
    """The ``token`` field of a url-encoded sign-in form."""
    try:
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    except ValueError:  # too many fields
        form = {}
    if "token" not in form:
        raise Problem("invalid-request", "send the sign-in form: a url-encoded body with the "
                      "field 'token'", field="token")
    return form["token"][0]


def _html(text: str) -> HTMLResponse:
    return HTMLResponse(text, headers=pages.SECURITY_HEADERS)

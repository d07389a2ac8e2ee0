"""The officer dashboard: read-only HTML pages the gateway serves under ``/dashboard``.

``routes`` (sign-in by one-time token, the session cookie, authorisation: ``Dashboard``),
``data`` (what a page shows, read from the ledger and the audit log), ``pages`` (the HTML,
with a strict Content-Security-Policy) and ``chart`` (the budget burn-down as inline SVG).
"""

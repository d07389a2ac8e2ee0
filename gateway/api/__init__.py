"""The node's HTTP API: the Starlette app, its middleware and what it needs to speak HTTP.

``app`` (the routes, wired to the node's services in ``gateway.node``), ``middleware``
(signature, nonce and body limit, before any handler), ``signatures`` (RFC 9421 verification),
``json_body`` (the one strict JSON parser), ``problems`` (a ``Problem`` as problem+json),
``audit`` (the officer's audit-log endpoints, the periodic checkpoint), ``openapi`` (the
document, and ``python -m gateway.api.openapi`` writes docs/openapi.json), ``access_log`` and
``server`` (how ``fedgate serve`` runs the app on uvicorn).

Handlers parse, call a service of ``gateway.node`` and respond; the node never imports this
package.
"""
